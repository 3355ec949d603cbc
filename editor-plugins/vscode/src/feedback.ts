// What happened to each suggestion, told to the server. No `vscode` import: unit-tested in Node.
//
// VS Code's stable API (1.91-1.100) tells an extension only two things about an inline
// suggestion: that its provider returned it, and (through the item's command) that the user
// accepted all of it. Partial accepts, "shown" and dismissals are proposed API only, so the
// extension observes them itself:
// - shown: the provider returned the item and VS Code had not cancelled the request (the
//   API does not say whether the ghost text was drawn);
// - word / line accepts: the extension's own keybindings (ctrl+right, ctrl+down) run VS
//   Code's acceptNextWord / acceptNextLine and measure the text they inserted;
// - dismissed: the extension's Escape keybinding, while a suggestion is visible.
// A suggestion typed over without a decision is what the server calls rejected: a newer
// request for the same document supersedes it.
//
// The server takes one accept per suggestion, so partial accepts add up here and reach the
// server once: when the whole suggestion has been taken, when the user dismisses the rest,
// or when a newer request for the document, a close or a restart ends the suggestion.

export type Signal = "shown" | "dismissed";

export interface FeedbackSink {
  /** workspace/executeCommand ghostloop.accept [id, length in code points]. */
  accept(completionId: string, length: number): Promise<void>;
  /** ghostloop/feedback {completionId, kind}. */
  signal(completionId: string, kind: Signal): Promise<void>;
}

/** Length in code points: the server counts characters, VS Code counts UTF-16 units. */
export function codePoints(text: string): number {
  let n = 0;
  for (const _ of text) {
    n += 1;
  }
  return n;
}

/**
 * The edit that turned `before` into `after`, as the text inserted and removed between the
 * common prefix and suffix. An accept inserts at the cursor, so this is the accepted text.
 */
export function editBetween(before: string, after: string): { inserted: string; removed: string } {
  let start = 0;
  const shortest = Math.min(before.length, after.length);
  while (start < shortest && before.charCodeAt(start) === after.charCodeAt(start)) {
    start += 1;
  }
  let end = 0;
  while (
    end < shortest - start &&
    before.charCodeAt(before.length - 1 - end) === after.charCodeAt(after.length - 1 - end)
  ) {
    end += 1;
  }
  // Never split a surrogate pair.
  if (start > 0 && isHighSurrogate(after.charCodeAt(start - 1))) {
    start -= 1;
  }
  return {
    inserted: after.slice(start, after.length - end),
    removed: before.slice(start, before.length - end),
  };
}

function isHighSurrogate(code: number): boolean {
  return code >= 0xd800 && code <= 0xdbff;
}

interface Current {
  id: string;
  length: number;
  accepted: number;
}

export class FeedbackTracker {
  private readonly current = new Map<string, Current>();
  private readonly reported = new Set<string>();

  constructor(private readonly sink: FeedbackSink) {}

  /** The id of the suggestion now offered for `uri`, if any. */
  currentId(uri: string): string | undefined {
    return this.current.get(uri)?.id;
  }

  /** The provider returned `text` as suggestion `id` for `uri`. */
  async shown(uri: string, id: string, text: string): Promise<void> {
    await this.settle(uri);
    this.current.set(uri, { id, length: codePoints(text), accepted: 0 });
    await this.sink.signal(id, "shown");
  }

  /** A word or line of the suggestion for `uri` was accepted: `inserted` code points. */
  async partial(uri: string, inserted: number): Promise<void> {
    const entry = this.current.get(uri);
    if (!entry || inserted <= 0) {
      return;
    }
    entry.accepted = Math.min(entry.length, entry.accepted + inserted);
    if (entry.accepted === entry.length) {
      await this.finish(uri, entry, entry.length);
    }
  }

  /** The item's command ran: the rest of suggestion `id` was accepted. */
  async accepted(id: string, length: number): Promise<void> {
    for (const [uri, entry] of this.current) {
      if (entry.id === id) {
        await this.finish(uri, entry, entry.length);
        return;
      }
    }
    if (!this.reported.has(id)) {
      // Not tracked (e.g. shown before a restart of the tracker): still the user's accept.
      this.reported.add(id);
      await this.sink.accept(id, length);
    }
  }

  /** The user dismissed the suggestion for `uri` (Escape). */
  dismissed(uri: string): Promise<void> {
    return this.end(uri, true);
  }

  /** The suggestion for `uri` ended without a decision here (a newer request, a close). */
  settle(uri: string): Promise<void> {
    return this.end(uri, false);
  }

  /** Every open suggestion ends (the client stops). */
  async settleAll(): Promise<void> {
    for (const uri of [...this.current.keys()]) {
      await this.settle(uri);
    }
  }

  /** What was taken of it is accepted; nothing taken: dismissed, or left to the server,
   * which counts a suggestion superseded by a newer request as rejected. */
  private async end(uri: string, dismissed: boolean): Promise<void> {
    const entry = this.current.get(uri);
    if (!entry) {
      return;
    }
    if (entry.accepted > 0) {
      await this.finish(uri, entry, entry.accepted);
      return;
    }
    this.current.delete(uri);
    if (dismissed) {
      this.reported.add(entry.id);
      await this.sink.signal(entry.id, "dismissed");
    }
  }

  private async finish(uri: string, entry: Current, length: number): Promise<void> {
    this.current.delete(uri);
    if (this.reported.has(entry.id)) {
      return;
    }
    this.reported.add(entry.id);
    if (this.reported.size > 10_000) {
      this.reported.clear(); // ids are unique; the set only guards against double reports
    }
    await this.sink.accept(entry.id, length);
  }
}
