import assert from "node:assert/strict";
import { test } from "node:test";

import { describe } from "../src/status";

test("ready shows the model file's stem and the adapter", () => {
  const view = describe("ready", {
    state: "ready",
    model: "/x/SmolLM2-135M-Instruct.Q4_1.gguf",
    adapter: "v7",
    device: "cpu",
    backend: "torch",
    canary: { version: "v8", share: 0.1 },
  });
  assert.equal(view.state, "ready");
  assert.equal(view.text, "$(sparkle) SmolLM2-135M-Instruct.Q4_1 · v7");
  assert.match(view.tooltip, /adapter v7, canary v8/);
  assert.match(view.tooltip, /\(cpu, torch\)/);
});

test("while the model is exported for onnxruntime the item says torch serves", () => {
  const status = { state: "ready", model: "m", adapter: null, device: "cpu" };
  const exporting = describe("ready", { ...status, backend: "torch", onnx_export: "running" });
  assert.equal(exporting.text, "$(sparkle) m · base · torch");
  assert.match(exporting.tooltip, /Served by torch while the model is exported for onnxruntime/);
  const done = describe("ready", {
    ...status,
    backend: "onnxruntime int8 (cpu)",
    onnx_export: "done",
  });
  assert.equal(done.text, "$(sparkle) m · base");
  assert.match(done.tooltip, /\(cpu, onnxruntime int8 \(cpu\)\)/);
  const failed = describe("ready", {
    ...status,
    backend: "torch",
    onnx_export: "failed: no space left on device",
  });
  assert.match(failed.tooltip, /export failed: no space left on device; torch serves/);
});

test("no adapter reads as the base model", () => {
  assert.match(describe("ready", { state: "ready", model: "m", adapter: null }).text, /m · base$/);
});

test("the server's own state wins over the client's ready", () => {
  assert.equal(describe("ready", { state: "starting" }).state, "starting");
  const error = describe("ready", { state: "error", error: "model file missing" });
  assert.equal(error.state, "error");
  assert.match(error.tooltip, /model file missing/);
});

test("off and client errors say what to do", () => {
  assert.match(describe("off", undefined).tooltip, /Click to turn completions on/);
  const view = describe("error", undefined, "could not start `ghostloop serve`");
  assert.match(view.tooltip, /could not start/);
  assert.match(view.tooltip, /Restart the server/);
});
