import assert from "node:assert/strict";
import { test } from "node:test";

import {
  type ConfigSource,
  initializationOptionsFor,
  parseAddress,
  readSettings,
  SettingsError,
} from "../src/settings";

function config(values: Record<string, unknown>): ConfigSource {
  return { get: <T>(key: string) => values[key] as T | undefined };
}

test("defaults start `ghostloop serve` over stdio with telemetry on", () => {
  const settings = readSettings(config({}));
  assert.deepEqual(settings.launch, { kind: "stdio", command: "ghostloop", args: ["serve"], env: {} });
  assert.equal(settings.enable, true);
  assert.equal(settings.debounceMs, 150);
  assert.deepEqual(settings.initializationOptions, { telemetry: true });
});

test("an address connects over TCP instead of starting a server", () => {
  assert.deepEqual(readSettings(config({ "server.address": " gpu-box:2087 " })).launch, {
    kind: "tcp",
    host: "gpu-box",
    port: 2087,
    tls: false,
  });
  assert.deepEqual(parseAddress("[::1]:9"), { kind: "tcp", host: "::1", port: 9 });
  assert.deepEqual(parseAddress("2087"), { kind: "tcp", host: "127.0.0.1", port: 2087 });
});

test("bad addresses name the setting and the expected form", () => {
  assert.throws(() => parseAddress("gpu-box"), /ghostloop.server.address must be host:port/);
  assert.throws(() => parseAddress("h:70000"), /outside 1-65535/);
  assert.throws(() => parseAddress("h:0"), SettingsError);
});

test("telemetry off is passed to the server and cannot be overridden by serverOptions", () => {
  const off = readSettings(config({ telemetry: false, serverOptions: { telemetry: true, maxNewTokens: 8 } }));
  assert.deepEqual(off.initializationOptions, { telemetry: false, maxNewTokens: 8 });
  const optedOutTwice = readSettings(config({ serverOptions: { telemetry: false } }));
  assert.equal(optedOutTwice.initializationOptions.telemetry, false);
});

test("wrong types are refused with the setting's name", () => {
  assert.throws(() => readSettings(config({ "server.args": "serve" })), /ghostloop.server.args must be a list/);
  assert.throws(() => readSettings(config({ "server.env": { A: 1 } })), /ghostloop.server.env/);
  assert.throws(() => readSettings(config({ "server.command": "  " })), /ghostloop.server.command is empty/);
  assert.throws(() => readSettings(config({ debounceMs: -1 })), /ghostloop.debounceMs/);
  assert.throws(() => readSettings(config({ serverOptions: [1] })), /ghostloop.serverOptions/);
});

test("TLS to a team server, with a private CA when set", () => {
  const launch = readSettings(
    config({ "server.address": "gpu-box:2087", "server.tls": true, "server.caFile": " /etc/team-ca.pem " }),
  ).launch;
  assert.deepEqual(launch, { kind: "tcp", host: "gpu-box", port: 2087, tls: true, caFile: "/etc/team-ca.pem" });
  assert.throws(
    () => readSettings(config({ "server.address": "gpu-box:2087", "server.caFile": "/ca.pem" })),
    /ghostloop.server.caFile is set but ghostloop.server.tls is off/,
  );
});

test("the token from secret storage goes to a team server only, never from settings.json", () => {
  const team = readSettings(config({ "server.address": "gpu-box:2087", serverOptions: { token: "leaked" } }));
  assert.deepEqual(initializationOptionsFor(team, "glt_secret"), { telemetry: true, token: "glt_secret" });
  assert.deepEqual(initializationOptionsFor(team, undefined), { telemetry: true });
  const local = readSettings(config({}));
  assert.deepEqual(initializationOptionsFor(local, "glt_secret"), { telemetry: true });
  assert.equal(team.initializationOptions.token, "leaked"); // untouched: the copy drops it
});
