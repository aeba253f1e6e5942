/**
 * Flow control of one runtime: how many events to pull, and when a pulled
 * event may start its reconcile. No I/O: the pull loop and the dispatcher
 * report what happens and ask what to do.
 *
 * An event goes queued (pulled, waiting for a slot) → running (its
 * reconcile holds one of `concurrency` slots until the code really returns)
 * → settling (its logs, result and ack being stored; no slot held) → gone.
 * Settling beside the next reconciles is what keeps the slots busy: at
 * concurrency 1 a reconcile otherwise waits for two round trips of the one
 * before it. Settling is bounded too, so a NATS that stores slowly stops new
 * reconciles rather than piling results up in memory.
 *
 * Pulling ahead (the queue) saves a pull round trip per refill and batches
 * pulls, but an event in the queue waits behind the running ones while
 * another instance might be idle. So the queue holds only what the slots get
 * through in about {@link PREFETCH_MS} at the pace of recent reconciles (a
 * moving average), at most `max(concurrency, 16)`: CI jobs of minutes get
 * exactly as many events as they have free slots. Queued events are kept alive with `+WPI` like running
 * ones, so none waits past its `ack_wait`.
 *
 * @module
 */

/** How long (ms) the queue of events pulled ahead should take the slots to get through. */
export const PREFETCH_MS = 100;
/** The queue's bound is `max(concurrency, this)`. */
export const MIN_PREFETCH_CAP = 16;
/** Least number of events that may be settling at once. */
export const MIN_SETTLING = 64;
/** Weight of the newest reconcile in the moving average of their durations. */
const EWMA_WEIGHT = 0.2;

/** Counts and limits of one runtime's events in hand. */
export class Flow {
  /** Reconciles that may run at once. */
  readonly concurrency: number;
  /** Events that may be settling before new reconciles wait. */
  readonly maxSettling: number;
  /** Pulled, waiting for a slot. */
  queued = 0;
  /** Slots held: reconciles running (hung ones included) or events not yet past admission. */
  running = 0;
  /** Events past their reconcile, storing logs and result. */
  settling = 0;
  /** Moving average of reconcile durations, ms; NaN until one has finished. */
  averageMs = Number.NaN;
  #waiters: (() => void)[] = [];

  /** Limits for `concurrency` slots. */
  constructor(concurrency: number) {
    this.concurrency = concurrency;
    this.maxSettling = Math.max(2 * concurrency, MIN_SETTLING);
  }

  /**
   * How many events may wait in the queue now: as many as the slots finish
   * in about {@link PREFETCH_MS} at the average reconcile's pace, at most
   * `max(concurrency, 16)`; none before a reconcile has finished.
   */
  get prefetch(): number {
    if (!(this.averageMs >= 0)) return 0;
    const cap = Math.max(this.concurrency, MIN_PREFETCH_CAP);
    if (this.averageMs === 0) return cap;
    return Math.min(cap, Math.floor(this.concurrency * PREFETCH_MS / this.averageMs));
  }

  /**
   * How many events to pull now (0: wait for {@link changed}). Pulls refill
   * the window of slots plus prefetch in batches of a quarter of it, unless
   * a slot sits idle with nothing queued.
   */
  wanted(): number {
    const window = this.concurrency + this.prefetch;
    const room = window - this.queued - this.running;
    if (room <= 0) return 0;
    if (this.queued === 0 && this.running < this.concurrency) return room;
    return room >= Math.ceil(window / 4) ? room : 0;
  }

  /** Whether a queued event may start now: a free slot, and settling below its bound. */
  canStart(): boolean {
    return this.queued > 0 && this.running < this.concurrency &&
      this.settling < this.maxSettling;
  }

  /** An event was pulled. */
  pulled(): void {
    this.queued++;
    this.#changed();
  }

  /** A queued event leaves the queue without starting (handed back on shutdown). */
  dropped(): void {
    this.queued--;
    this.#changed();
  }

  /** A queued event takes a slot. */
  started(): void {
    this.queued--;
    this.running++;
  }

  /** An event's reconcile ended after `ms`: it settles now (its slot is freed by {@link returned}). */
  reconciled(ms: number): void {
    this.settling++;
    this.averageMs = Number.isNaN(this.averageMs)
      ? ms
      : this.averageMs + EWMA_WEIGHT * (ms - this.averageMs);
  }

  /** The driver's code of a reconciled event returned: its slot is free. */
  returned(): void {
    this.running--;
    this.#changed();
  }

  /** An event is settled; `reconciled` says whether it had been reported to {@link reconciled}. */
  settled(reconciled: boolean): void {
    if (reconciled) this.settling--;
    else this.running--;
    this.#changed();
  }

  /** Resolves at the next change of the counts (or {@link wake}). */
  changed(): Promise<void> {
    return new Promise((r) => this.#waiters.push(r));
  }

  /** Wakes every waiter, e.g. to notice a shutdown. */
  wake(): void {
    this.#changed();
  }

  #changed(): void {
    if (this.#waiters.length) this.#waiters.splice(0).forEach((w) => w());
  }
}
