// The server's stderr in the Ghostloop log at each line's level. No `vscode` import:
// unit-tested in Node.
//
// vscode-languageclient 10+ logs every stderr line of a server as an error. Once a session
// is initialized the server sends its log as window/logMessage (typed by level); what it
// writes to stderr before then, and anything Python prints on a crash, is read here.

export type Level = "debug" | "info" | "warn" | "error";

// Python's logging as `ghostloop serve` formats it: "2026-12-07 11:39:47,862 INFO name msg"
const LOGGING_LINE = /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) /;

const LEVELS: Record<string, Level> = {
  DEBUG: "debug",
  INFO: "info",
  WARNING: "warn",
  ERROR: "error",
  CRITICAL: "error",
};

/** The level of one stderr line; a line that is not a log record (a traceback) is an error. */
export function stderrLevel(line: string): Level {
  const found = LOGGING_LINE.exec(line);
  return found ? LEVELS[found[1]] : "error";
}
