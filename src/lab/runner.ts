/**
 * Host side of the command runner: one connection (the introspector's
 * virtio-serial port, or a lab's control socket, which relays the same frames)
 * carrying any number of commands at once, each with its stdout and stderr
 * kept apart and its exit status.
 */
import * as net from 'node:net';
import { LabError } from './errors.js';
import { encodeFrame, encodeRun, FRAME, FrameDecoder, parseExit, type ExitStatus } from './runner-protocol.js';

export interface CommandIo {
  stdout(chunk: Buffer): void;
  stderr(chunk: Buffer): void;
}

export interface CommandHandle {
  readonly id: number;
  /** Resolves with the exit status; rejects with LabError ELAB_EXEC (did not start) or ELAB_GONE (connection lost). */
  readonly done: Promise<ExitStatus>;
  /** Send a signal to the command's process group inside. */
  kill(signal: number): void;
}

interface Job { io: CommandIo; resolve(s: ExitStatus): void; reject(e: Error): void }

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export class RunnerConnection {
  private readonly jobs = new Map<number, Job>();
  private readonly decoder = new FrameDecoder();
  private nextId = 1;
  private helloText: string | null = null;
  private helloWaiters: ((t: string) => void)[] = [];
  private closed = false;
  private closeReason = 'the runner connection closed';
  private readonly closeListeners: ((reason: string) => void)[] = [];

  private constructor(private readonly sock: net.Socket, private readonly label: string) {
    sock.on('data', (d: Buffer) => {
      let frames;
      try {
        frames = this.decoder.push(d);
      } catch (e) {
        this.shutdown(`${label}: ${(e as Error).message}`);
        return;
      }
      for (const f of frames) this.onFrame(f.type, f.id, f.payload);
    });
    sock.on('error', (e) => { this.closeReason = `${label}: ${e.message}`; });
    sock.on('close', () => this.shutdown(this.closeReason));
  }

  /**
   * Connect to a unix socket, retrying while it does not exist or refuses
   * (QEMU creates the serial socket as it starts), for at most `timeoutMs`.
   * `dead()` returning a reason stops the retries early (the VM exited).
   */
  static async connect(socketPath: string, label: string, timeoutMs: number, dead: () => string | null = () => null): Promise<RunnerConnection> {
    const deadline = Date.now() + timeoutMs;
    let last = '';
    for (;;) {
      const why = dead();
      if (why) throw new LabError('ELAB_BOOT', `${label}: ${why} before its runner socket ${socketPath} accepted`);
      try {
        const sock = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.createConnection(socketPath);
          s.once('connect', () => { s.removeAllListeners('error'); resolve(s); });
          s.once('error', reject);
        });
        return new RunnerConnection(sock, label);
      } catch (e) {
        last = (e as Error).message;
      }
      if (Date.now() > deadline) throw new LabError('ETIMEDOUT', `${label}: could not connect to ${socketPath} within ${timeoutMs} ms (${last})`);
      await sleep(50);
    }
  }

  private onFrame(type: number, id: number, payload: Buffer): void {
    if (type === FRAME.HELLO) {
      this.helloText = payload.toString('utf8');
      for (const w of this.helloWaiters.splice(0)) w(this.helloText);
      return;
    }
    const job = this.jobs.get(id);
    if (!job) return;
    if (type === FRAME.OUT) job.io.stdout(payload);
    else if (type === FRAME.ERR) job.io.stderr(payload);
    else if (type === FRAME.EXIT || type === FRAME.FAIL) {
      this.jobs.delete(id);
      if (type === FRAME.FAIL) job.reject(new LabError('ELAB_EXEC', `${this.label}: ${payload.toString('utf8')}`));
      else {
        try {
          job.resolve(parseExit(payload));
        } catch (e) {
          job.reject(e as Error);
        }
      }
    }
  }

  /** The runner's status lines (what /init found: share, network, errors); PINGs until they come. */
  async hello(timeoutMs: number, dead: () => string | null = () => null): Promise<string> {
    if (this.helloText !== null) return this.helloText;
    const got = new Promise<string>((r) => this.helloWaiters.push(r));
    let text: string | null = null;
    void got.then((t) => { text = t; });
    const deadline = Date.now() + timeoutMs;
    let lastPing = 0;
    while (text === null) {
      if (this.closed) throw new LabError('ELAB_BOOT', `${this.label}: ${this.closeReason} before the runner said hello`);
      const why = dead();
      if (why) throw new LabError('ELAB_BOOT', `${this.label}: ${why} before the runner said hello`);
      if (Date.now() > deadline) throw new LabError('ETIMEDOUT', `${this.label}: the runner did not say hello within ${timeoutMs} ms`);
      // The guest may open its port before we connect; a PING makes it say hello again.
      if (Date.now() - lastPing > 500) {
        this.sock.write(encodeFrame(FRAME.PING, 0));
        lastPing = Date.now();
      }
      await Promise.race([got, sleep(50)]);
    }
    return text;
  }

  /** Start a command; flags bit 0 = run in the initramfs instead of chrooted into the share. */
  start(argv: readonly string[], env: Readonly<Record<string, string>>, cwd: string, io: CommandIo, flags = 0): CommandHandle {
    const id = this.nextId++;
    const frame = encodeRun(id, argv, env, cwd, flags);
    const done = new Promise<ExitStatus>((resolve, reject) => {
      if (this.closed) {
        reject(new LabError('ELAB_GONE', `${this.label}: ${this.closeReason}`));
        return;
      }
      this.jobs.set(id, { io, resolve, reject });
      this.sock.write(frame);
    });
    return {
      id,
      done,
      kill: (signal: number) => {
        if (!this.closed && this.jobs.has(id)) this.sock.write(encodeFrame(FRAME.KILL, id, String(signal)));
      },
    };
  }

  get isClosed(): boolean { return this.closed; }

  onClose(cb: (reason: string) => void): void {
    if (this.closed) cb(this.closeReason);
    else this.closeListeners.push(cb);
  }

  private shutdown(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.closeReason = reason;
    this.sock.destroy();
    for (const [, j] of this.jobs) j.reject(new LabError('ELAB_GONE', `${this.label}: ${reason} while a command ran`, { hint: 'the lab was shut down or its introspector VM died; see its console log' }));
    this.jobs.clear();
    for (const cb of this.closeListeners.splice(0)) cb(reason);
  }

  close(): void {
    this.shutdown('closed by the host');
  }

  /** Do not keep the process alive for this connection alone. */
  unref(): void { this.sock.unref(); }
}
