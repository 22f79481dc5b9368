//! What the load generator sends, and what the pipeline must make of it: a plan of
//! *stories*, each a click and the postbacks about it, with the outcome every postback
//! must get (the oracle the verifier checks against). Pure and deterministic for a seed.
//!
//! Story kinds, mixed in configurable shares:
//! - plain: a click through `GET /click`, then an FTD → attributed;
//! - out of order: an operator-minted click ID whose postback is sent *before* the click
//!   (`POST /v1/clicks`) → held by the attributor, then attributed;
//! - unknown click: a postback for a click that never comes → `unknown_click`;
//! - late: a minted click dated just over the attribution window ago → `outside_window`;
//! - event time: the same old click, but the postback says (`event_time`) that the
//!   conversion happened inside the window → attributed, with that event time;
//! - reversal: a click, an approved FTD, then its reversal → an update (version 2) that
//!   pays nothing and takes the payout back (`payout_delta`);
//! - conflict: a minted click registered, then registered again to another affiliate →
//!   one `click_conflict` rejection, and the FTD is attributed to the first affiliate;
//! - pixel: a click through `GET /click`, then its FTD from a browser (`GET /pixel` with
//!   the click cookie, no click ID) → attributed, `trust: "pixel"` (needs ingest's
//!   `[pixel]` with a cookie).
//!
//! On plain and out-of-order stories, two extras: a status update (the FTD first
//! `pending`, then `approved` → an update, version 2) and a duplicate (the last postback
//! sent again → `duplicate`).

use s2s_common::contract::RejectReason;
use serde::{Deserialize, Serialize};

/// The outcome a postback must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "decision")]
pub enum Expect {
    Attributed,
    Updated { version: u32 },
    Rejected { reason: RejectReason },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// `GET /click`: ingest mints the click ID (read from the redirect).
    Click {
        offer: String,
        aff: String,
        sub1: String,
    },
    /// `POST /v1/clicks`: an operator-minted click ID, dated `ago_ms` before now.
    /// `conflict`: the ID is already registered to another affiliate; this registration
    /// must be refused (`click_conflict`) and the first one stay.
    MintedClick {
        click_id: String,
        offer: String,
        aff: String,
        ago_ms: i64,
        #[serde(default)]
        conflict: bool,
    },
    /// `GET /pixel` with the cookie the story's click set, and no click ID.
    Pixel {
        event: String,
        txn_id: String,
        status: String,
        expect: Expect,
    },
    /// `GET /postback` for the story's click, or for `click_id` when set; with
    /// `event_time` = the story's minted click's time + `event_after_click_ms` when that is
    /// set (relative to the click, so that however long the steps took the conversion
    /// stays where the plan put it).
    Postback {
        click_id: Option<String>,
        event: String,
        txn_id: String,
        status: String,
        expect: Expect,
        #[serde(default)]
        event_after_click_ms: Option<i64>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Plain,
    OutOfOrder,
    UnknownClick,
    Late,
    EventTime,
    Reversal,
    Conflict,
    Pixel,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Story {
    pub id: usize,
    pub kind: Kind,
    pub steps: Vec<Step>,
}

/// Shares are fractions of all stories; the rest are plain.
#[derive(Debug, Clone, PartialEq)]
pub struct Mix {
    pub stories: usize,
    pub out_of_order: f64,
    pub unknown_click: f64,
    pub late: f64,
    pub event_time: f64,
    pub reversals: f64,
    pub conflicts: f64,
    pub pixel: f64,
    /// Of plain and out-of-order stories: with a status update.
    pub updates: f64,
    /// Of plain and out-of-order stories: with the last postback sent twice.
    pub duplicates: f64,
    pub seed: u64,
    /// The offer clicks go to; it must exist in ingest and pay in the attributor.
    pub offer: String,
    /// The offer's attribution window for FTDs.
    pub window_ms: i64,
    /// How far outside the window late clicks are dated. Keep it under the attributor's
    /// grace period: older clicks may already have been expired from its store.
    pub late_by_ms: i64,
    /// A prefix for minted and unknown click IDs, unique per run.
    pub run: String,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            stories: 1000,
            out_of_order: 0.1,
            unknown_click: 0.05,
            late: 0.05,
            event_time: 0.05,
            reversals: 0.05,
            conflicts: 0.05,
            pixel: 0.05,
            updates: 0.2,
            duplicates: 0.1,
            seed: 1,
            offer: "1".into(),
            window_ms: 30 * 24 * 3_600_000,
            late_by_ms: 10_000,
            run: "run".into(),
        }
    }
}

/// The stories of `mix`, the same for the same seed.
pub fn plan(mix: &Mix) -> Vec<Story> {
    let mut rng = fastrand::Rng::with_seed(mix.seed);
    (0..mix.stories)
        .map(|id| story(mix, &mut rng, id))
        .collect()
}

fn story(mix: &Mix, rng: &mut fastrand::Rng, id: usize) -> Story {
    let aff = format!("{}", rng.u32(1..=200));
    let sub1 = format!("s{}", rng.u32(0..50));
    let minted = format!("{}-{id}", mix.run);
    let draw = rng.f64();
    let txn = |n: u32| format!("T{id}-{n}");
    let postback_at = |click_id: Option<String>,
                       txn_id: String,
                       status: &str,
                       expect,
                       event_after_click_ms: Option<i64>| Step::Postback {
        click_id,
        event: "ftd".into(),
        txn_id,
        status: status.into(),
        expect,
        event_after_click_ms,
    };
    let postback = |click_id: Option<String>, txn_id: String, status: &str, expect| {
        postback_at(click_id, txn_id, status, expect, None)
    };
    let minted_click = |aff: &str, ago_ms: i64, conflict: bool| Step::MintedClick {
        click_id: minted.clone(),
        offer: mix.offer.clone(),
        aff: aff.to_string(),
        ago_ms,
        conflict,
    };
    let told = |kind, steps| Story { id, kind, steps };
    // The shares, in the order they are drawn.
    let mut edge = 0.0;
    let mut next = |share: f64| {
        edge += share;
        draw < edge
    };
    if next(mix.event_time) {
        // The click is as old as a late one; the conversion happened inside the window.
        let pb = postback_at(
            Some(minted.clone()),
            txn(1),
            "approved",
            Expect::Attributed,
            Some(mix.window_ms - mix.late_by_ms),
        );
        let click = minted_click(&aff, mix.window_ms + mix.late_by_ms, false);
        return told(Kind::EventTime, vec![click, pb]);
    }
    if next(mix.reversals) {
        let steps = vec![
            Step::Click {
                offer: mix.offer.clone(),
                aff,
                sub1,
            },
            postback(None, txn(1), "approved", Expect::Attributed),
            postback(None, txn(1), "reversed", Expect::Updated { version: 2 }),
        ];
        return told(Kind::Reversal, steps);
    }
    if next(mix.conflicts) {
        let thief = format!("{}", 1000 + rng.u32(1..=200));
        let steps = vec![
            minted_click(&aff, 0, false),
            minted_click(&thief, 0, true),
            postback(Some(minted.clone()), txn(1), "approved", Expect::Attributed),
        ];
        return told(Kind::Conflict, steps);
    }
    if next(mix.pixel) {
        let steps = vec![
            Step::Click {
                offer: mix.offer.clone(),
                aff,
                sub1,
            },
            Step::Pixel {
                event: "ftd".into(),
                txn_id: txn(1),
                status: "approved".into(),
                expect: Expect::Attributed,
            },
        ];
        return told(Kind::Pixel, steps);
    }
    let draw = (draw - edge).max(0.0);
    let (kind, mut steps) = if draw < mix.unknown_click {
        let pb = postback(
            Some(format!("{minted}-never")),
            txn(1),
            "approved",
            Expect::Rejected {
                reason: RejectReason::UnknownClick,
            },
        );
        return Story {
            id,
            kind: Kind::UnknownClick,
            steps: vec![pb],
        };
    } else if draw < mix.unknown_click + mix.late {
        let click = minted_click(&aff, mix.window_ms + mix.late_by_ms, false);
        let pb = postback(
            Some(minted),
            txn(1),
            "approved",
            Expect::Rejected {
                reason: RejectReason::OutsideWindow,
            },
        );
        return Story {
            id,
            kind: Kind::Late,
            steps: vec![click, pb],
        };
    } else if draw < mix.unknown_click + mix.late + mix.out_of_order {
        (Kind::OutOfOrder, Vec::new())
    } else {
        (
            Kind::Plain,
            vec![Step::Click {
                offer: mix.offer.clone(),
                aff: aff.clone(),
                sub1,
            }],
        )
    };
    let target = (kind == Kind::OutOfOrder).then(|| minted.clone());
    let update = rng.f64() < mix.updates;
    let duplicate = rng.f64() < mix.duplicates;
    let first_status = if update { "pending" } else { "approved" };
    steps.push(postback(
        target.clone(),
        txn(1),
        first_status,
        Expect::Attributed,
    ));
    if kind == Kind::OutOfOrder {
        steps.push(minted_click(&aff, 0, false));
    }
    if update {
        steps.push(postback(
            target.clone(),
            txn(1),
            "approved",
            Expect::Updated { version: 2 },
        ));
    }
    if duplicate {
        steps.push(postback(
            target,
            txn(1),
            "approved",
            Expect::Rejected {
                reason: RejectReason::Duplicate,
            },
        ));
    }
    Story { id, kind, steps }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expects(s: &Story) -> Vec<Expect> {
        s.steps
            .iter()
            .filter_map(|st| match st {
                Step::Postback { expect, .. } | Step::Pixel { expect, .. } => Some(*expect),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_plan_and_the_mix_is_honoured() {
        let mix = Mix {
            stories: 4000,
            ..Mix::default()
        };
        let a = plan(&mix);
        assert_eq!(a, plan(&mix));
        assert_ne!(
            a,
            plan(&Mix {
                seed: 2,
                ..mix.clone()
            })
        );
        let share = |k: Kind| a.iter().filter(|s| s.kind == k).count() as f64 / 4000.0;
        assert!((share(Kind::UnknownClick) - 0.05).abs() < 0.02);
        assert!((share(Kind::Late) - 0.05).abs() < 0.02);
        assert!((share(Kind::OutOfOrder) - 0.1).abs() < 0.02);
        for k in [Kind::EventTime, Kind::Reversal, Kind::Conflict, Kind::Pixel] {
            assert!((share(k) - 0.05).abs() < 0.02, "{k:?}");
        }
        let updated = a
            .iter()
            .filter(|s| matches!(s.kind, Kind::Plain | Kind::OutOfOrder))
            .filter(|s| expects(s).contains(&Expect::Updated { version: 2 }))
            .count() as f64;
        assert!((updated / (4000.0 * 0.6) - 0.2).abs() < 0.03, "{updated}");
    }

    #[test]
    fn each_story_says_what_each_postback_must_get() {
        for s in plan(&Mix::default()) {
            let e = expects(&s);
            match s.kind {
                Kind::UnknownClick => assert_eq!(
                    e,
                    [Expect::Rejected {
                        reason: RejectReason::UnknownClick
                    }]
                ),
                Kind::Late => {
                    assert!(
                        matches!(s.steps[0], Step::MintedClick { ago_ms, .. } if ago_ms > 30 * 24 * 3_600_000)
                    );
                    assert_eq!(
                        e,
                        [Expect::Rejected {
                            reason: RejectReason::OutsideWindow
                        }]
                    );
                }
                Kind::EventTime => {
                    assert!(
                        matches!(s.steps[0], Step::MintedClick { ago_ms, .. } if ago_ms > 30 * 24 * 3_600_000)
                    );
                    assert!(
                        matches!(s.steps[1], Step::Postback { event_after_click_ms: Some(after), expect: Expect::Attributed, .. } if after < 30 * 24 * 3_600_000),
                        "happened inside the window: {:?}",
                        s.steps[1]
                    );
                }
                Kind::Pixel => {
                    assert!(matches!(s.steps[0], Step::Click { .. }));
                    assert!(matches!(s.steps[1], Step::Pixel { .. }));
                    assert_eq!(e, [Expect::Attributed]);
                }
                Kind::Reversal => {
                    assert_eq!(e, [Expect::Attributed, Expect::Updated { version: 2 }])
                }
                Kind::Conflict => {
                    let registrations: Vec<(&str, bool)> = s
                        .steps
                        .iter()
                        .filter_map(|st| match st {
                            Step::MintedClick { aff, conflict, .. } => {
                                Some((aff.as_str(), *conflict))
                            }
                            _ => None,
                        })
                        .collect();
                    assert!(
                        matches!(registrations.as_slice(), [(a, false), (b, true)] if a != b),
                        "{registrations:?}"
                    );
                    assert_eq!(e, [Expect::Attributed]);
                }
                Kind::Plain | Kind::OutOfOrder => {
                    assert_eq!(e[0], Expect::Attributed);
                    let rest: Vec<Expect> = e[1..].to_vec();
                    assert!(
                        [
                            vec![],
                            vec![Expect::Updated { version: 2 }],
                            vec![Expect::Rejected {
                                reason: RejectReason::Duplicate
                            }],
                            vec![
                                Expect::Updated { version: 2 },
                                Expect::Rejected {
                                    reason: RejectReason::Duplicate
                                }
                            ],
                        ]
                        .contains(&rest),
                        "{rest:?}"
                    );
                    if s.kind == Kind::OutOfOrder {
                        assert!(
                            matches!(s.steps[0], Step::Postback { .. })
                                && matches!(s.steps[1], Step::MintedClick { ago_ms: 0, .. }),
                            "the postback goes first"
                        );
                    }
                }
            }
        }
    }
}
