#!/usr/bin/env python3
"""Consuming the conversions topic, as a data team would.

Reads the topic `read_committed` (under exactly_once, outcomes of aborted cycles are never
seen), routes on the `s2s-kind` header without decoding, validates every conversion
against its JSON Schema (schemas/conversion.schema.json), and keeps the latest version of
each conversion: a conversion's versions share `conversion_id`, and `version` grows with
each status change. A record that fails validation is reported and skipped, never
guessed at.

    python3 examples/consume_conversions.py --brokers localhost:9092 \
        --topic s2s.conversions --until-end

With --until-end it stops at the end of every partition and prints the latest version of
each conversion as one JSON line, sorted by conversion_id (a summary goes to stderr).
Without it, it follows the topic and prints each newer version as it arrives.
Needs confluent-kafka and jsonschema (pip install confluent-kafka jsonschema).
"""

import argparse
import json
import pathlib
import sys
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException
from jsonschema import Draft202012Validator

SCHEMA = pathlib.Path(__file__).resolve().parent.parent / "schemas" / "conversion.schema.json"


def headers_of(msg):
    return {k: (v or b"").decode("utf-8", "replace") for k, v in (msg.headers() or [])}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--brokers", required=True)
    p.add_argument("--topic", default="s2s.conversions")
    p.add_argument("--group", default=f"conversions-example-{uuid.uuid4()}")
    p.add_argument("--schema", default=str(SCHEMA))
    p.add_argument("--until-end", action="store_true", help="stop at the end of the topic")
    args = p.parse_args()

    validator = Draft202012Validator(json.loads(pathlib.Path(args.schema).read_text()))
    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": args.group,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    })
    consumer.subscribe([args.topic])
    latest, records, invalid, other = {}, 0, 0, 0
    assigned, at_end = None, set()
    try:
        while True:
            msg = consumer.poll(1.0)
            if assigned is None and consumer.assignment():
                assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add((msg.topic(), msg.partition()))
                    if args.until_end and assigned and at_end >= assigned:
                        break
                    continue
                raise KafkaException(msg.error())
            at_end.discard((msg.topic(), msg.partition()))
            records += 1
            if headers_of(msg).get("s2s-kind") != "conversion":
                other += 1
                continue
            try:
                record = json.loads(msg.value())
                errors = sorted(validator.iter_errors(record), key=lambda e: list(e.path))
            except ValueError as e:
                record, errors = None, [e]
            if errors:
                invalid += 1
                where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
                print(f"invalid record at {where}: {errors[0]}", file=sys.stderr)
                continue
            known = latest.get(record["conversion_id"])
            if known is None or record["version"] > known["version"]:
                latest[record["conversion_id"]] = record
                if not args.until_end:
                    print(json.dumps(record), flush=True)
    finally:
        consumer.close()
    for cid in sorted(latest):
        print(json.dumps(latest[cid]))
    print(f"{records} records, {len(latest)} conversions, {invalid} invalid, {other} not conversions",
          file=sys.stderr)


if __name__ == "__main__":
    main()
