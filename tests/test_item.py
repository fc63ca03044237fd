# -*- test-case-name: tests.test_item -*-
import json

from twisted.trial.unittest import SynchronousTestCase

from snq.item import MAX_DEPTH, BadItem, Item


class ItemTests(SynchronousTestCase):
    def test_roundTrip(self):
        item = Item(transport="webhook", payload={"a": [1, "é"]}, site="ex",
                    priority=3, created=12.5)
        again = Item.fromJSON(item.toJSON())
        self.assertEqual(again, item)

    def test_runAtAndKey(self):
        item = Item(transport="log", payload=1, run_at=1e9, key="order-7")
        self.assertEqual(Item.fromJSON(item.toJSON()), item)
        self.assertEqual((item.dueAt(5.0), item.dueAt(5.0, delay=9)), (1e9, 1e9))

    def test_optionalKeysOnlyWhenUsed(self):
        """A frame without run_at or key is one any version-1 daemon takes."""
        frame = json.loads(Item(transport="log", payload=1).toJSON())
        self.assertNotIn("run_at", frame)
        self.assertNotIn("key", frame)
        self.assertEqual(Item(transport="log", payload=1).dueAt(5.0, 2.0), 7.0)

    def test_minimalProducerFrame(self):
        """A producer in another language needs only transport and payload."""
        item = Item.fromJSON(b'{"transport": "log", "payload": null}')
        self.assertEqual((item.site, item.attempts, item.priority, item.payload),
                         ("default", 0, 0, None))
        self.assertEqual(len(item.id), 32)

    def test_retriedCountsAttempts(self):
        item = Item(transport="log", payload=1)
        self.assertEqual(item.retried().retried().attempts, 2)
        self.assertEqual(item.retried().id, item.id)

    def assertBad(self, frame, reason):
        e = self.assertRaises(BadItem, Item.fromJSON, frame)
        self.assertIn(reason, str(e))

    def test_badFrames(self):
        self.assertBad(b"\xff\xfe", "not UTF-8")
        self.assertBad(b"{nope", "not JSON")
        self.assertBad(b"[1]", "JSON list, not an object")
        self.assertBad(b'{"payload": 1}', "no 'transport'")
        self.assertBad(b'{"transport": "log"}', "no 'payload'")
        self.assertBad(b'{"transport": "a/b", "payload": 1}', "'transport' must")
        self.assertBad(b'{"transport": "log", "payload": 1, "v": 2}', "version 2")
        self.assertBad(b'{"transport": "log", "payload": 1, "x": 2}',
                       "unknown envelope keys: x")
        self.assertBad(json.dumps({"transport": "log", "payload": 1,
                                   "attempts": -1}), "'attempts'")
        self.assertBad(json.dumps({"transport": "log", "payload": 1,
                                   "created": "yesterday"}), "'created'")
        self.assertBad(json.dumps({"transport": "log", "payload": 1,
                                   "priority": True}), "'priority'")
        self.assertBad(json.dumps({"transport": "log", "payload": 1,
                                   "run_at": "soon"}), "'run_at'")
        self.assertBad(b'{"transport": "log", "payload": 1, "run_at": NaN}',
                       "'run_at'")
        self.assertBad(json.dumps({"transport": "log", "payload": 1,
                                   "key": ""}), "'key'")
        self.assertBad(json.dumps({"transport": "log", "payload": 1,
                                   "key": "k" * 256}), "'key'")

    def test_oddities(self):
        """What a hostile producer might send is refused, each with a reason."""
        base = b'"transport": "log", "payload": '
        self.assertBad(b'{"v": true, ' + base + b"1}", "version True")
        for itemId in (b"0", b"false", b'""', b"[]"):
            self.assertBad(b'{"id": ' + itemId + b", " + base + b"1}",
                           "'id' must be a non-empty string")
        self.assertBad(json.dumps({"id": "a\x00b", "transport": "log",
                                   "payload": 1}), "'id' must be at most 64")
        self.assertBad(json.dumps({"id": "x" * 65, "transport": "log",
                                   "payload": 1}), "'id' must be at most 64")
        self.assertBad(json.dumps({"transport": "lo\ng", "payload": 1}),
                       "'transport' must")
        self.assertBad(json.dumps({"site": "a\x7fb", "transport": "log",
                                   "payload": 1}), "'site' must be at most 64")
        self.assertBad(b"{" + base + b'"\\ud800"}', "lone UTF-16 surrogate")
        self.assertBad(b'{"transport": "log", "payload": 1, "\\udfff": 1}',
                       "lone UTF-16 surrogate")

    def test_nullIdIsLeftOut(self):
        item = Item.fromJSON(b'{"id": null, "transport": "log", "payload": 1}')
        self.assertEqual(len(item.id), 32)

    def test_surrogatePairsAreText(self):
        item = Item.fromJSON(b'{"transport": "log", "payload": "\\ud83d\\ude00"}')
        self.assertEqual(item.payload, "\N{GRINNING FACE}")
        self.assertEqual(Item.fromJSON(item.toJSON()), item)

    def test_nesting(self):
        """Deep enough for any payload, not so deep that encoding can fail."""
        def nested(depth):
            return (b'{"transport": "log", "payload": ' + b"[" * (depth - 1)
                    + b"]" * (depth - 1) + b"}")

        item = Item.fromJSON(nested(MAX_DEPTH))
        self.assertEqual(Item.fromJSON(item.toJSON()), item)
        self.assertBad(nested(MAX_DEPTH + 1), f"nested more than {MAX_DEPTH}")
        # Far beyond what Python's decoder takes: no RecursionError escapes.
        self.assertBad(nested(100_000), "nested deeper than JSON can be decoded")
        wide = json.dumps({"transport": "log", "payload": [{"a": [1]}] * 1000})
        self.assertEqual(len(Item.fromJSON(wide).payload), 1000)

    def test_everyDecodedItemEncodes(self):
        """Whatever decodes goes back on a queue: toJSON never fails later."""
        frames = [b'{"transport": "log", "payload": "\\u0000\\uffff\\ud800\\udc00"}',
                  b'{"transport": "log", "payload": {"\\u00e9": 1e308}}']
        for frame in frames:
            item = Item.fromJSON(frame)
            self.assertEqual(Item.fromJSON(item.toJSON()), item)
