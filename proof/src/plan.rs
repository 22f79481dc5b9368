//! What the load generator sends, and what the pipeline must make of it: a plan of
//! *stories*, each a click and the postbacks about it, with the outcome every postback
//! must get (the oracle the verifier checks against). Pure and deterministic for a seed.
//!
//! Story kinds, mixed in configurable shares:
//! - plain: a click through `GET /click`, then an FTD → attributed;
//! - out of order: an operator-minted click ID whose postback is sent *before* the click
//!   (`POST /v1/clicks`) → held by the attributor, then attributed;
//! - unknown click: a postback for a click that never comes → `unknown_click`;
//! - late: a minted click dated just over the attribution window ago → `outside_window`.
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
    MintedClick {
        click_id: String,
        offer: String,
        aff: String,
        ago_ms: i64,
    },
    /// `GET /postback` for the story's click, or for `click_id` when set.
    Postback {
        click_id: Option<String>,
        event: String,
        txn_id: String,
        status: String,
        expect: Expect,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Plain,
    OutOfOrder,
    UnknownClick,
    Late,
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
    let postback =
        |click_id: Option<String>, txn_id: String, status: &str, expect| Step::Postback {
            click_id,
            event: "ftd".into(),
            txn_id,
            status: status.into(),
            expect,
        };
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
        let click = Step::MintedClick {
            click_id: minted.clone(),
            offer: mix.offer.clone(),
            aff,
            ago_ms: mix.window_ms + mix.late_by_ms,
        };
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
        steps.push(Step::MintedClick {
            click_id: minted,
            offer: mix.offer.clone(),
            aff,
            ago_ms: 0,
        });
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
                Step::Postback { expect, .. } => Some(*expect),
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
        let updated = a
            .iter()
            .filter(|s| expects(s).contains(&Expect::Updated { version: 2 }))
            .count() as f64;
        assert!((updated / (4000.0 * 0.8) - 0.2).abs() < 0.03, "{updated}");
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
