// Internal: the duplicate filter of sse.ts, in bounded memory.
//
// A Conveyor log stream replays every stored line of the run on each
// (re)connect, in the order of its store's keys: by driver, then by
// timestamp. The filter remembers the `window` most recently yielded events
// exactly (a 53-bit hash of each key and how often it came), and for what
// fell out of the window, the newest time per group (driver). On a later
// connection an event is dropped as replayed when this connection has not yet
// sent more events of its key than were yielded (within the window), or when
// it is older than what its group already let fall out of the window (or as
// old, and one of the events of that very time that fell out).

/** Where an event sits in a replaying server's order. */
export interface ReplayOrder {
  /** The events of one group are replayed in time order (a driver's log lines). */
  group: string;
  /** Its time, in ms; NaN when unknown (then it is never dropped by time). */
  time: number;
}

/** Most groups whose eviction times are kept; beyond, the oldest is forgotten. */
const MAX_GROUPS = 1_024;
/** Most keys kept per group for events of its newest evicted time. */
const MAX_TIES = 1_024;

/** What fell out of the window for one group: its newest time, and the keys of that time. */
interface Mark {
  time: number;
  ties: Set<number>;
}

/** Bounded memory of what a stream has yielded, to drop what it replays. */
export class ReplayFilter {
  readonly #size: number;
  // A ring of the yielded events, oldest first from #head.
  readonly #hashes: Float64Array;
  readonly #times: Float64Array;
  readonly #groups: (string | undefined)[];
  #head = 0;
  #length = 0;
  /** Ring entries by hash: how many events of that key the window holds. */
  readonly #counts = new Map<number, number>();
  /** Events of this connection by hash, for keys the window holds. */
  readonly #seen = new Map<number, number>();
  /** Per group, what fell out of the window. */
  readonly #evicted = new Map<string, Mark>();
  /** Group names by value, so the ring shares one string per group. */
  readonly #names = new Map<string, string>();
  #connection = 0;

  constructor(window: number) {
    this.#size = window;
    this.#hashes = new Float64Array(window);
    this.#times = new Float64Array(window);
    this.#groups = new Array(window);
  }

  /** A new connection starts: its events are counted afresh. */
  connected(): void {
    this.#connection++;
    this.#seen.clear();
  }

  /** Whether to yield an event with key hash `hash`; records it when so. */
  admit(hash: number, order?: ReplayOrder): boolean {
    const held = this.#counts.get(hash) ?? 0;
    const n = (this.#seen.get(hash) ?? 0) + 1;
    if (held > 0) this.#seen.set(hash, n);
    if (n <= held) return false; // replayed, and still in the window
    if (this.#connection > 1 && order !== undefined) {
      const mark = this.#evicted.get(order.group);
      if (mark && (order.time < mark.time || (order.time === mark.time && mark.ties.has(hash)))) {
        return false; // replayed, from before the window
      }
    }
    this.#record(hash, order);
    this.#seen.set(hash, n);
    return true;
  }

  /** Keys held, for tests of the bound. */
  get held(): number {
    return this.#counts.size;
  }

  #record(hash: number, order: ReplayOrder | undefined): void {
    if (this.#length === this.#size) this.#evictOldest();
    const at = (this.#head + this.#length) % this.#size;
    this.#hashes[at] = hash;
    this.#times[at] = order?.time ?? NaN;
    this.#groups[at] = order && this.#intern(order.group);
    this.#length++;
    this.#counts.set(hash, (this.#counts.get(hash) ?? 0) + 1);
  }

  #evictOldest(): void {
    const at = this.#head;
    const hash = this.#hashes[at];
    const left = (this.#counts.get(hash) ?? 1) - 1;
    if (left > 0) this.#counts.set(hash, left);
    else {
      this.#counts.delete(hash);
      this.#seen.delete(hash);
    }
    const group = this.#groups[at];
    const time = this.#times[at];
    if (group !== undefined && !Number.isNaN(time)) {
      const mark = this.#evicted.get(group);
      if (mark === undefined) {
        if (this.#evicted.size >= MAX_GROUPS) {
          // Forgetting a group can only let its old lines through again.
          this.#evicted.delete(this.#evicted.keys().next().value!);
        }
        this.#evicted.set(group, { time, ties: new Set([hash]) });
      } else if (time > mark.time) {
        mark.time = time;
        mark.ties = new Set([hash]);
      } else if (time === mark.time && mark.ties.size < MAX_TIES) {
        // (Past the cap, further lines of that time may come again: never lost.)
        mark.ties.add(hash);
      }
    }
    this.#groups[at] = undefined;
    this.#head = (this.#head + 1) % this.#size;
    this.#length--;
  }

  #intern(group: string): string {
    const known = this.#names.get(group);
    if (known !== undefined) return known;
    if (this.#names.size >= MAX_GROUPS) this.#names.clear();
    this.#names.set(group, group);
    return group;
  }
}
