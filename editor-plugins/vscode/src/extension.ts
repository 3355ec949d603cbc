// Ghostloop for VS Code: starts (or connects to) the language server, shows its inline
// completions as ghost text through vscode-languageclient, and tells the server what the
// user did with each suggestion (src/feedback.ts says what the stable API can observe).

import { readFileSync } from "node:fs";
import * as net from "node:net";
import * as readline from "node:readline";
import type { Readable } from "node:stream";
import * as tls from "node:tls";
import * as vscode from "vscode";
import {
  CloseAction,
  type ErrorHandler,
  ExecuteCommandRequest,
  LanguageClient,
  type LanguageClientOptions,
  type ServerOptions,
  State as ClientState,
  type StreamInfo,
} from "vscode-languageclient/node";

import { codePoints, editBetween, FeedbackTracker, type Signal } from "./feedback";
import {
  type GhostloopSettings,
  initializationOptionsFor,
  readSettings,
  RESTART_KEYS,
  SettingsError,
  type TcpLaunch,
} from "./settings";
import { stderrLevel } from "./serverLog";
import { describe, type ServerStatus, type State } from "./status";

const ACCEPT_COMMAND = "ghostloop.accept"; // the server's command (lsp_server/protocol.py)
const ITEM_ACCEPT_COMMAND = "ghostloop._acceptItem"; // ours: runs when VS Code accepts an item
const FEEDBACK_NOTIFICATION = "ghostloop/feedback";
const STATUS_REQUEST = "ghostloop/status";
const TOKEN_SECRET = "ghostloop.server.token"; // SecretStorage key of the team server token
const UNAUTHORIZED = -32003; // the team server refused the token (lsp_server/protocol.py)

class Ghostloop implements vscode.Disposable {
  private client: LanguageClient | undefined;
  private settings: GhostloopSettings | undefined;
  private clientState: State = "off";
  private serverStatus: ServerStatus | undefined;
  private errorDetail: string | undefined;
  private poll: NodeJS.Timeout | undefined;
  private readonly item: vscode.StatusBarItem;
  private readonly log: vscode.LogOutputChannel;
  private readonly tracker: FeedbackTracker;
  private lifecycle: Promise<void> = Promise.resolve();

  constructor(private readonly secrets: vscode.SecretStorage) {
    this.log = vscode.window.createOutputChannel("Ghostloop", { log: true });
    this.item = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
    this.item.name = "Ghostloop";
    this.item.command = "ghostloop.toggle";
    this.item.show();
    this.tracker = new FeedbackTracker({
      accept: (id, length) => this.send(() => this.executeAccept(id, length)),
      signal: (id, kind) => this.send(() => this.notify(id, kind)),
    });
    this.render();
  }

  dispose(): void {
    this.stopPolling();
    this.item.dispose();
    this.log.dispose();
  }

  // ---- lifecycle -------------------------------------------------------------------------

  /** Runs start/stop steps one after the other, whatever order the user clicks in. */
  private serialize(step: () => Promise<void>): Promise<void> {
    this.lifecycle = this.lifecycle.then(step, step);
    return this.lifecycle;
  }

  /** Reads the settings and starts or stops the client to match. */
  apply(restart = false): Promise<void> {
    return this.serialize(async () => {
      let settings: GhostloopSettings;
      try {
        settings = readSettings(vscode.workspace.getConfiguration("ghostloop"));
      } catch (error) {
        await this.stop();
        this.fail(error instanceof SettingsError ? error.message : String(error));
        return;
      }
      this.settings = settings;
      if (!settings.enable) {
        await this.stop();
        this.setState("off");
        return;
      }
      if (this.client && !restart) {
        return;
      }
      await this.stop();
      await this.start(settings);
    });
  }

  /** The extension goes: the server stops (partial accepts delivered first). */
  shutdown(): Promise<void> {
    return this.serialize(() => this.stop());
  }

  private async start(settings: GhostloopSettings): Promise<void> {
    this.errorDetail = undefined;
    this.serverStatus = undefined;
    this.setState("starting");
    const token = await this.secrets.get(TOKEN_SECRET);
    // A team server that refused the token closes the connection: that is no crash to
    // restart from (vscode-languageclient would retry five times), but a token to set.
    let refused = false;
    let fallback: ErrorHandler | undefined;
    const errorHandler: ErrorHandler = {
      error: (error, message, count) => fallback!.error(error, message, count),
      closed: () =>
        refused ? { action: CloseAction.DoNotRestart, handled: true } : fallback!.closed(),
    };
    const client = new LanguageClient("ghostloop", "Ghostloop", this.serverOptions(settings), {
      ...this.clientOptions(settings, token),
      errorHandler,
      initializationFailedHandler: (error: unknown) => {
        refused = isRefusal(error);
        return false; // no retry: the error is shown once, with what to do
      },
    });
    fallback = client.createDefaultErrorHandler();
    client.onDidChangeState((change) => {
      if (this.client !== client) {
        return;
      }
      if (change.newState === ClientState.Stopped && this.clientState !== "off") {
        this.fail("the server stopped; see the Ghostloop log");
      } else if (change.newState === ClientState.Running && this.clientState === "error") {
        // vscode-languageclient restarted a crashed server: follow it again
        this.errorDetail = undefined;
        this.setState("starting");
        this.startPolling();
      }
    });
    this.client = client;
    try {
      await client.start();
    } catch (error) {
      this.client = undefined;
      const message = error instanceof Error ? error.message : String(error);
      const where =
        settings.launch.kind === "tcp"
          ? `could not connect to ${settings.launch.host}:${settings.launch.port}`
          : `could not start \`${settings.launch.command} ${settings.launch.args.join(" ")}\``;
      this.fail(`${where}: ${message}`);
      if (refused || isRefusal(error)) {
        void vscode.window
          .showErrorMessage(
            `Ghostloop: the team server refused the connection: ${message}`,
            "Set Server Token",
          )
          .then((choice) => {
            if (choice) {
              void vscode.commands.executeCommand("ghostloop.setToken");
            }
          });
        return;
      }
      void vscode.window
        .showErrorMessage(
          `Ghostloop ${where}. Check ghostloop.server.* in your settings, then restart.`,
          "Open settings",
          "Show log",
        )
        .then((choice) => {
          if (choice === "Open settings") {
            void vscode.commands.executeCommand("workbench.action.openSettings", "ghostloop");
          } else if (choice === "Show log") {
            this.log.show();
          }
        });
      return;
    }
    this.startPolling();
  }

  private async stop(): Promise<void> {
    this.stopPolling();
    const client = this.client;
    if (!client) {
      return;
    }
    await this.tracker.settleAll(); // partial accepts reach the server before it goes
    this.client = undefined;
    this.setState("off");
    try {
      await client.stop(5000);
    } catch (error) {
      this.log.warn(`stopping the server: ${String(error)}`);
    }
  }

  private serverOptions(settings: GhostloopSettings): ServerOptions {
    const launch = settings.launch;
    if (launch.kind === "tcp") {
      return () => connectTo(launch);
    }
    return {
      command: launch.command,
      args: launch.args,
      options: { env: { ...process.env, ...launch.env } },
    };
  }

  private clientOptions(
    settings: GhostloopSettings,
    token: string | undefined,
  ): LanguageClientOptions {
    return {
      documentSelector: [{ scheme: "file" }, { scheme: "untitled" }],
      outputChannel: this.log,
      traceOutputChannel: traceChannel(this.log),
      stdioOptions: {
        stdout: (input, channel) => lines(input, (line) => channel.info(line)),
        stderr: (input, channel) => lines(input, (line) => channel[stderrLevel(line)](line)),
      },
      initializationOptions: initializationOptionsFor(settings, token),
      middleware: {
        provideInlineCompletionItems: async (document, position, context, token, next) => {
          const uri = document.uri.toString();
          // Partial accepts of the previous suggestion reach the server before this request
          // supersedes it.
          await this.tracker.settle(uri);
          const debounce = this.settings?.debounceMs ?? 0;
          if (context.triggerKind === vscode.InlineCompletionTriggerKind.Automatic && debounce) {
            await sleep(debounce, token);
          }
          if (token.isCancellationRequested) {
            return null;
          }
          const result = await next(document, position, context, token);
          if (!result || token.isCancellationRequested) {
            return result;
          }
          const items = Array.isArray(result) ? result : result.items;
          for (const item of items) {
            const command = item.command;
            if (command?.command !== ACCEPT_COMMAND) {
              continue;
            }
            const [id, length] = (command.arguments ?? []) as [string, number];
            item.command = { ...command, command: ITEM_ACCEPT_COMMAND, arguments: [id, length] };
            const text = typeof item.insertText === "string" ? item.insertText : "";
            if (text) {
              await this.tracker.shown(uri, id, text);
            }
          }
          return result;
        },
        didClose: async (document, next) => {
          await this.tracker.settle(document.uri.toString());
          return next(document);
        },
      },
    };
  }

  // ---- talking to the server -----------------------------------------------------------

  /** Feedback never interrupts typing: a failure goes to the log. */
  private async send(action: () => Promise<void>): Promise<void> {
    try {
      await action();
    } catch (error) {
      this.log.warn(`feedback not delivered: ${String(error)}`);
    }
  }

  private async executeAccept(id: string, length: number): Promise<void> {
    if (!this.client?.isRunning()) {
      return;
    }
    await this.client.sendRequest(ExecuteCommandRequest.type, {
      command: ACCEPT_COMMAND,
      arguments: [id, length],
    });
  }

  private async notify(id: string, kind: Signal): Promise<void> {
    if (!this.client?.isRunning()) {
      return;
    }
    await this.client.sendNotification(FEEDBACK_NOTIFICATION, { completionId: id, kind });
  }

  // ---- status ----------------------------------------------------------------------------

  private startPolling(): void {
    this.stopPolling();
    const client = this.client;
    const tick = async (): Promise<void> => {
      if (this.client !== client || !client) {
        return; // stopped or replaced: its own polling runs
      }
      if (!client.isRunning()) {
        this.poll = setTimeout(() => void tick(), 1_000);
        return;
      }
      try {
        this.serverStatus = await client.sendRequest<ServerStatus>(STATUS_REQUEST);
        if (this.clientState !== "error") {
          this.setState(this.serverStatus.state === "ready" ? "ready" : "starting");
        }
      } catch (error) {
        this.log.warn(`${STATUS_REQUEST} failed: ${String(error)}`);
      }
      if (this.client === client) {
        this.poll = setTimeout(() => void tick(), this.clientState === "ready" ? 10_000 : 1_000);
      }
    };
    void tick();
  }

  private stopPolling(): void {
    if (this.poll) {
      clearTimeout(this.poll);
      this.poll = undefined;
    }
  }

  private fail(detail: string): void {
    this.errorDetail = detail;
    this.log.error(detail);
    this.setState("error");
  }

  private setState(state: State): void {
    this.clientState = state;
    void vscode.commands.executeCommand(
      "setContext",
      "ghostloop.running",
      state === "ready" || state === "starting",
    );
    this.render();
  }

  private render(): void {
    const view = describe(this.clientState, this.serverStatus, this.errorDetail);
    this.item.text = view.text;
    this.item.tooltip = view.tooltip;
    this.item.backgroundColor =
      view.state === "error" ? new vscode.ThemeColor("statusBarItem.errorBackground") : undefined;
  }

  // ---- commands --------------------------------------------------------------------------

  async setEnabled(enable: boolean): Promise<void> {
    const config = vscode.workspace.getConfiguration("ghostloop");
    const target =
      config.inspect("enable")?.workspaceValue !== undefined
        ? vscode.ConfigurationTarget.Workspace
        : vscode.ConfigurationTarget.Global;
    await config.update("enable", enable, target); // onDidChangeConfiguration applies it
  }

  async toggle(): Promise<void> {
    await this.setEnabled(!(this.settings?.enable ?? true));
  }

  /** ctrl+right / ctrl+down: VS Code accepts the next word or line; we measure it. */
  async acceptPart(kind: "Word" | "Line"): Promise<void> {
    const editor = vscode.window.activeTextEditor;
    if (!editor) {
      return;
    }
    const document = editor.document;
    const before = document.getText();
    await vscode.commands.executeCommand(`editor.action.inlineSuggest.acceptNext${kind}`);
    const { inserted, removed } = editBetween(before, document.getText());
    await this.tracker.partial(
      document.uri.toString(),
      codePoints(inserted) - codePoints(removed),
    );
  }

  async acceptItem(id: unknown, length: unknown): Promise<void> {
    if (typeof id !== "string" || typeof length !== "number") {
      this.log.warn(`${ITEM_ACCEPT_COMMAND}: bad arguments ${JSON.stringify([id, length])}`);
      return;
    }
    await this.tracker.accepted(id, length);
  }

  async dismiss(): Promise<void> {
    const editor = vscode.window.activeTextEditor;
    if (editor) {
      await this.tracker.dismissed(editor.document.uri.toString());
    }
    await vscode.commands.executeCommand("editor.action.inlineSuggest.hide");
  }

  async openDashboard(): Promise<void> {
    const url = this.settings?.dashboardUrl ?? "http://127.0.0.1:8765/";
    await vscode.env.openExternal(vscode.Uri.parse(url));
  }

  showLog(): void {
    this.log.show();
  }
}

function sleep(ms: number, token: vscode.CancellationToken): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    const listener = token.onCancellationRequested(done);
    function done(): void {
      clearTimeout(timer);
      listener.dispose();
      resolve();
    }
  });
}

/** The team server's answer to a missing, wrong or revoked token (-32003). */
function isRefusal(error: unknown): boolean {
  const code = (error as { code?: unknown } | undefined)?.code;
  return code === UNAUTHORIZED || /access token/.test(String(error));
}

/** A socket to a team server: plain TCP, or TLS checked against the system's CAs (or
 * ghostloop.server.caFile's). */
function connectTo(launch: TcpLaunch): Promise<StreamInfo> {
  return new Promise<StreamInfo>((resolve, reject) => {
    if (!launch.tls) {
      const socket = net.connect(launch.port, launch.host);
      socket.once("connect", () => resolve({ reader: socket, writer: socket }));
      socket.once("error", reject);
      return;
    }
    let ca: Buffer | undefined;
    try {
      ca = launch.caFile ? readFileSync(launch.caFile) : undefined;
    } catch (error) {
      reject(new Error(`cannot read ghostloop.server.caFile ${launch.caFile}: ${String(error)}`));
      return;
    }
    const socket = tls.connect({
      host: launch.host,
      port: launch.port,
      ca,
      servername: net.isIP(launch.host) ? undefined : launch.host,
    });
    socket.once("secureConnect", () => resolve({ reader: socket, writer: socket }));
    socket.once("error", reject);
  });
}

let instance: Ghostloop | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  const ghostloop = new Ghostloop(context.secrets);
  instance = ghostloop;
  const register = (name: string, run: (...args: unknown[]) => unknown): void => {
    context.subscriptions.push(vscode.commands.registerCommand(name, run));
  };
  register("ghostloop.enable", () => ghostloop.setEnabled(true));
  register("ghostloop.disable", () => ghostloop.setEnabled(false));
  register("ghostloop.toggle", () => ghostloop.toggle());
  register("ghostloop.restart", () => ghostloop.apply(true));
  register("ghostloop.trigger", () =>
    vscode.commands.executeCommand("editor.action.inlineSuggest.trigger"),
  );
  register("ghostloop.openDashboard", () => ghostloop.openDashboard());
  register("ghostloop.showLog", () => ghostloop.showLog());
  register("ghostloop.acceptWord", () => ghostloop.acceptPart("Word"));
  register("ghostloop.acceptLine", () => ghostloop.acceptPart("Line"));
  register("ghostloop.dismiss", () => ghostloop.dismiss());
  register("ghostloop.setToken", async () => {
    const token = await vscode.window.showInputBox({
      title: "Ghostloop: team server token",
      prompt: "The token your Ghostloop admin made with `ghostloop users add` (kept in VS Code's secret storage)",
      password: true,
      ignoreFocusOut: true,
    });
    if (token === undefined) {
      return; // cancelled: keep what is stored
    }
    if (token.trim()) {
      await context.secrets.store(TOKEN_SECRET, token.trim());
    } else {
      await context.secrets.delete(TOKEN_SECRET);
    }
    await ghostloop.apply(true);
  });
  register("ghostloop.clearToken", async () => {
    await context.secrets.delete(TOKEN_SECRET);
    await ghostloop.apply(true);
  });
  register(ITEM_ACCEPT_COMMAND, (id, length) => ghostloop.acceptItem(id, length));
  context.subscriptions.push(
    ghostloop,
    vscode.workspace.onDidChangeConfiguration((event) => {
      if (!event.affectsConfiguration("ghostloop")) {
        return;
      }
      const restart = RESTART_KEYS.some((key) => event.affectsConfiguration(key));
      void ghostloop.apply(restart);
    }),
  );
  await ghostloop.apply();
}

export async function deactivate(): Promise<void> {
  if (instance) {
    await instance.shutdown().catch(() => undefined);
  }
}

function lines(input: Readable, each: (line: string) => void): void {
  readline
    .createInterface({ input, crlfDelay: Infinity, terminal: false, historySize: 0 })
    .on("line", each);
}

/**
 * The Ghostloop log as vscode-languageclient's trace channel. The client (10+) traces
 * through `trace()`, and only while the channel's own level is Trace, so
 * `ghostloop.trace.server` alone showed nothing: here the setting decides, and the
 * messages are written at info level.
 */
function traceChannel(log: vscode.LogOutputChannel): vscode.LogOutputChannel {
  const wanted = (): boolean =>
    vscode.workspace.getConfiguration("ghostloop").get<string>("trace.server", "off") !== "off";
  return new Proxy(log, {
    get(target, property) {
      if (property === "logLevel") {
        return wanted() ? vscode.LogLevel.Trace : target.logLevel;
      }
      if (property === "trace") {
        return (message: string, ...args: unknown[]) => target.info(message, ...args);
      }
      const value: unknown = Reflect.get(target, property, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
}
