import assert from "node:assert/strict";
import { test } from "node:test";

import { stderrLevel } from "../src/serverLog";

test("a log record keeps its level", () => {
  const line = "2026-12-07 11:39:47,862 INFO lsp_server.handlers.lifecycle initialize client=x";
  assert.equal(stderrLevel(line), "info");
  assert.equal(stderrLevel("2026-12-07 11:39:47,862 WARNING x y"), "warn");
  assert.equal(stderrLevel("2026-12-07 11:39:47,862 DEBUG x y"), "debug");
  assert.equal(stderrLevel("2026-12-07 11:39:47,862 CRITICAL x y"), "error");
});

test("anything else on stderr is an error", () => {
  assert.equal(stderrLevel("Traceback (most recent call last):"), "error");
  assert.equal(stderrLevel("  File \"x.py\", line 1, in <module>"), "error");
  assert.equal(stderrLevel("INFO without a time"), "error");
});
