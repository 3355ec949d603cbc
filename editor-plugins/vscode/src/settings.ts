// The extension's settings, read into one checked value. No `vscode` import: unit-tested in Node.

export interface StdioLaunch {
  kind: "stdio";
  command: string;
  args: string[];
  env: Record<string, string>;
}

export interface TcpLaunch {
  kind: "tcp";
  host: string;
  port: number;
  /** Connect with TLS (the server has tls_cert/tls_key, or sits behind a TLS proxy). */
  tls?: boolean;
  /** PEM file of the CA that signed the server's certificate, when not a public one. */
  caFile?: string;
}

export type Launch = StdioLaunch | TcpLaunch;

export interface GhostloopSettings {
  enable: boolean;
  launch: Launch;
  debounceMs: number;
  dashboardUrl: string;
  /** Sent to the server as initializationOptions (Ghostloop settings, camelCase). */
  initializationOptions: Record<string, unknown>;
}

/** A setting the user must fix; the message names the setting and what is wrong. */
export class SettingsError extends Error {}

/** What `workspace.getConfiguration("ghostloop")` offers (get by dotted key). */
export interface ConfigSource {
  get<T>(key: string): T | undefined;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** "host:port", "[::1]:2087" or "port" (loopback). */
export function parseAddress(address: string): TcpLaunch {
  const text = address.trim();
  const bracketed = /^\[([^\]]+)\]:(\d+)$/.exec(text);
  const plain = /^([^:]+):(\d+)$/.exec(text);
  const bare = /^(\d+)$/.exec(text);
  let host: string;
  let portText: string;
  if (bracketed) {
    [, host, portText] = bracketed;
  } else if (plain) {
    [, host, portText] = plain;
  } else if (bare) {
    [host, portText] = ["127.0.0.1", bare[1]];
  } else {
    throw new SettingsError(
      `ghostloop.server.address must be host:port (e.g. 127.0.0.1:2087), got ${JSON.stringify(address)}`,
    );
  }
  const port = Number(portText);
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new SettingsError(`ghostloop.server.address: port ${portText} is outside 1-65535`);
  }
  return { kind: "tcp", host, port };
}

export function readSettings(config: ConfigSource): GhostloopSettings {
  const enable = config.get<boolean>("enable") ?? true;
  const address = (config.get<string>("server.address") ?? "").trim();
  let launch: Launch;
  if (address) {
    const tls = config.get<boolean>("server.tls") ?? false;
    const caFile = (config.get<string>("server.caFile") ?? "").trim();
    if (caFile && !tls) {
      throw new SettingsError(
        "ghostloop.server.caFile is set but ghostloop.server.tls is off: turn TLS on or clear the CA file",
      );
    }
    launch = { ...parseAddress(address), tls, ...(caFile ? { caFile } : {}) };
  } else {
    const command = (config.get<string>("server.command") ?? "ghostloop").trim();
    if (!command) {
      throw new SettingsError(
        "ghostloop.server.command is empty: set it to the `ghostloop` executable (a path or a name on PATH)",
      );
    }
    const args = config.get<unknown>("server.args") ?? ["serve"];
    if (!Array.isArray(args) || !args.every((arg) => typeof arg === "string")) {
      throw new SettingsError(
        `ghostloop.server.args must be a list of strings, got ${JSON.stringify(args)}`,
      );
    }
    const env = config.get<unknown>("server.env") ?? {};
    if (!isRecord(env) || !Object.values(env).every((value) => typeof value === "string")) {
      throw new SettingsError(
        `ghostloop.server.env must map names to strings, got ${JSON.stringify(env)}`,
      );
    }
    launch = { kind: "stdio", command, args, env: env as Record<string, string> };
  }
  const debounceMs = config.get<number>("debounceMs") ?? 150;
  if (!Number.isFinite(debounceMs) || debounceMs < 0 || debounceMs > 5000) {
    throw new SettingsError(`ghostloop.debounceMs must be 0-5000 ms, got ${debounceMs}`);
  }
  const extra = config.get<unknown>("serverOptions") ?? {};
  if (!isRecord(extra)) {
    throw new SettingsError(
      `ghostloop.serverOptions must be an object of Ghostloop settings, got ${JSON.stringify(extra)}`,
    );
  }
  const telemetry = config.get<boolean>("telemetry") ?? true;
  return {
    enable,
    launch,
    debounceMs,
    dashboardUrl: config.get<string>("dashboardUrl") ?? "http://127.0.0.1:8765/",
    // The telemetry switch wins over a `telemetry` key in serverOptions: opting out is final.
    initializationOptions: { ...extra, telemetry: telemetry && extra.telemetry !== false },
  };
}

/** The options sent at initialize: a team server's token rides along over TCP only (a
 * server the extension starts itself needs none, and the token stays on this machine). */
export function initializationOptionsFor(
  settings: GhostloopSettings,
  token: string | undefined,
): Record<string, unknown> {
  const options = { ...settings.initializationOptions };
  delete options.token; // never from settings.json: the token lives in SecretStorage
  if (settings.launch.kind === "tcp" && token) {
    options.token = token;
  }
  return options;
}

/** Settings whose change needs a new server (the rest apply at once). */
export const RESTART_KEYS = [
  "ghostloop.server.command",
  "ghostloop.server.args",
  "ghostloop.server.env",
  "ghostloop.server.address",
  "ghostloop.server.tls",
  "ghostloop.server.caFile",
  "ghostloop.telemetry",
  "ghostloop.serverOptions",
];
