// The status bar item's words. No `vscode` import: unit-tested in Node.

export type State = "starting" | "ready" | "error" | "off";

/** The part of `ghostloop/status` the status bar shows. */
export interface ServerStatus {
  state?: string;
  error?: string | null;
  model?: string | null;
  device?: string | null;
  adapter?: string | null;
  backend?: string | null;
  /** backend auto: "running" while torch serves and the model is exported for onnxruntime */
  onnx_export?: string | null;
  canary?: { version?: string; share?: number } | null;
}

export interface StatusView {
  state: State;
  text: string;
  tooltip: string;
}

function shortModel(model: string | null | undefined): string {
  if (!model) {
    return "model?";
  }
  const base = model.split(/[\\/]/).pop() ?? model;
  return base.replace(/\.(gguf|safetensors|onnx)$/i, "");
}

/**
 * What the item says. `clientState` is the extension's own view (off when disabled, error
 * when the server could not start); `server` is the last `ghostloop/status` answer.
 */
export function describe(
  clientState: State,
  server: ServerStatus | undefined,
  detail?: string,
): StatusView {
  if (clientState === "off") {
    return {
      state: "off",
      text: "$(circle-slash) Ghostloop",
      tooltip: "Ghostloop is off. Click to turn completions on.",
    };
  }
  if (clientState === "error" || server?.state === "error") {
    const why = detail ?? server?.error ?? "the server stopped";
    return {
      state: "error",
      text: "$(error) Ghostloop",
      tooltip: `Ghostloop error: ${why}\nRun "Ghostloop: Show the log" for details, "Ghostloop: Restart the server" to try again. Click to turn completions off.`,
    };
  }
  if (clientState === "starting" || server?.state !== "ready") {
    return {
      state: "starting",
      text: "$(loading~spin) Ghostloop",
      tooltip: "Ghostloop is starting (loading the model). Click to turn completions off.",
    };
  }
  const model = shortModel(server.model);
  const adapter = server.adapter ?? "base";
  const canary = server.canary?.version ? `, canary ${server.canary.version}` : "";
  const where = [server.device, server.backend].filter(Boolean).join(", ");
  const exporting = server.onnx_export === "running";
  let backendNote = "";
  if (exporting) {
    backendNote =
      ` Served by ${server.backend ?? "torch"} while the model is exported for onnxruntime ` +
      "(faster on a CPU); it switches by itself when the export is ready.";
  } else if (server.onnx_export?.startsWith("failed")) {
    backendNote = ` The onnxruntime export ${server.onnx_export}; ${server.backend ?? "torch"} serves.`;
  }
  return {
    state: "ready",
    text: `$(sparkle) ${model} · ${adapter}${exporting ? ` · ${server.backend ?? "torch"}` : ""}`,
    tooltip:
      `Ghostloop ready: ${server.model ?? "model?"}${where ? ` (${where})` : ""}, ` +
      `adapter ${adapter}${canary}.${backendNote} Click to turn completions off.`,
  };
}
