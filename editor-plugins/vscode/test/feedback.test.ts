import assert from "node:assert/strict";
import { test } from "node:test";

import { codePoints, editBetween, FeedbackTracker } from "../src/feedback";

function recorder(): { tracker: FeedbackTracker; sent: string[] } {
  const sent: string[] = [];
  const tracker = new FeedbackTracker({
    accept: async (id, length) => {
      sent.push(`accept ${id} ${length}`);
    },
    signal: async (id, kind) => {
      sent.push(`${kind} ${id}`);
    },
  });
  return { tracker, sent };
}

test("code points, not UTF-16 units", () => {
  assert.equal(codePoints("a😀b"), 3);
  assert.equal("a😀b".length, 4);
});

test("the edit between two texts is what was inserted at the cursor", () => {
  assert.deepEqual(editBetween("def f(x):\n    \n", "def f(x):\n    return x\n"), {
    inserted: "return x",
    removed: "",
  });
  // Repeated characters: the common prefix takes them; the length is still right.
  assert.equal(editBetween("aa", "aaaa").inserted.length, 2);
  // A surrogate pair is never split.
  assert.equal(editBetween("x😀", "x😀😀").inserted, "😀");
});

test("a full accept sends the suggestion's length once", async () => {
  const { tracker, sent } = recorder();
  await tracker.shown("file:///a.py", "c1", "return x");
  await tracker.accepted("c1", 8);
  await tracker.accepted("c1", 8);
  await tracker.settle("file:///a.py");
  assert.deepEqual(sent, ["shown c1", "accept c1 8"]);
});

test("partial accepts add up and reach the server when the suggestion ends", async () => {
  const { tracker, sent } = recorder();
  await tracker.shown("u", "c1", "return x + 1");
  await tracker.partial("u", 6);
  await tracker.partial("u", 2);
  assert.deepEqual(sent, ["shown c1"]); // still open: the user may take more
  await tracker.settle("u"); // a newer request for the document
  assert.deepEqual(sent, ["shown c1", "accept c1 8"]);
  await tracker.accepted("c1", 12); // VS Code's item command after it: already reported
  assert.deepEqual(sent, ["shown c1", "accept c1 8"]);
});

test("word by word to the end is a full accept", async () => {
  const { tracker, sent } = recorder();
  await tracker.shown("u", "c1", "ab cd");
  await tracker.partial("u", 3);
  await tracker.partial("u", 2);
  assert.deepEqual(sent, ["shown c1", "accept c1 5"]);
});

test("partial then Tab accepts the whole suggestion", async () => {
  const { tracker, sent } = recorder();
  await tracker.shown("u", "c1", "ab cd");
  await tracker.partial("u", 3);
  await tracker.accepted("c1", 5);
  assert.deepEqual(sent, ["shown c1", "accept c1 5"]);
});

test("Escape dismisses; after a partial accept it keeps what was taken", async () => {
  const { tracker, sent } = recorder();
  await tracker.shown("u", "c1", "abc");
  await tracker.dismissed("u");
  await tracker.shown("u", "c2", "abc def");
  await tracker.partial("u", 4);
  await tracker.dismissed("u");
  await tracker.dismissed("u"); // nothing open any more
  assert.deepEqual(sent, ["shown c1", "dismissed c1", "shown c2", "accept c2 4"]);
});

test("a suggestion ignored is left to the server (rejected when superseded)", async () => {
  const { tracker, sent } = recorder();
  await tracker.shown("u", "c1", "abc");
  await tracker.shown("u", "c2", "abd");
  await tracker.settleAll();
  assert.deepEqual(sent, ["shown c1", "shown c2"]);
  assert.equal(tracker.currentId("u"), undefined);
});

test("documents are tracked apart", async () => {
  const { tracker, sent } = recorder();
  await tracker.shown("a", "c1", "abc");
  await tracker.shown("b", "c2", "xyz");
  await tracker.partial("a", 1);
  await tracker.dismissed("b");
  await tracker.settleAll();
  assert.deepEqual(sent, ["shown c1", "shown c2", "dismissed c2", "accept c1 1"]);
});

test("a partial accept longer than the suggestion is capped", async () => {
  const { tracker, sent } = recorder();
  await tracker.shown("u", "c1", "ab");
  await tracker.partial("u", 10);
  assert.deepEqual(sent, ["shown c1", "accept c1 2"]);
});
