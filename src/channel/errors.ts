/**
 * Errors of the KVMI socket channel (tool side). All extend KvmmemError, so
 * callers switch on `code` as everywhere else in the library:
 *
 * - KvmiError     the host answered a command with err != 0 (code 'EAGAIN', ...)
 * - VmGoneError   'VM_GONE': the connection ended (unhook, close, protocol error)
 * - ProtocolError 'ERR_KVMI_PROTOCOL': framing/handshake violation (`reason`)
 * - ChannelLimitError 'ERR_KVMI_LIMIT': a ProtocolError for a peer over a per-connection bound (`limit`)
 * - PeerRefusedError 'EACCES' / 'EEXIST': the tool refused the peer (credentials, duplicate UUID)
 * - TimeoutError  'ETIMEDOUT'
 *
 * Messages never contain token bytes.
 */
import { ERRNO, errnoName } from '../abi/errno.js';
import { describeErrno, KvmmemError } from '../errors.js';

const KVMI_HINTS: Readonly<Record<number, string>> = {
  [ERRNO.EAGAIN]: 'too many unconsumed tokens on the host: consume or let them expire (3 s) before asking for more',
  [ERRNO.ENOSYS]: 'the host does not implement this command',
  [ERRNO.KVM_ENOSYS]: 'the host does not implement this command',
  [ERRNO.EINVAL]: 'the host rejected the message: non-zero padding or invalid arguments',
  [ERRNO.EPERM]: 'the host does not allow this command or event for this VM (it is disallowed by the device manager or KVM)',
  [ERRNO.ENOMEM]: 'the host is out of memory',
};

/** The host answered a command with a non-zero error code. */
export class KvmiError extends KvmmemError {
  /** The seq of the request this error answers. */
  readonly seq: number | undefined;

  /**
   * `err` as carried in kvmi_error_code (negative, e.g. -11 or -1000 for
   * -KVM_ENOSYS); `message` is the command name, e.g. 'KVMI_GET_MAP_TOKEN'.
   */
  constructor(err: number, message: string, opts: { seq?: number; hint?: string; vm?: string; detail?: string } = {}) {
    const n = Math.abs(err);
    const hint = opts.hint ?? KVMI_HINTS[n];
    const what = opts.detail === undefined ? message : `${message}(${opts.detail})`;
    super(`${describeErrno(n, what)}${opts.vm === undefined ? '' : ` [VM ${opts.vm}]`}`, {
      code: errnoName(n), errno: -n, syscall: message, ...(hint === undefined ? {} : { hint }),
    });
    this.seq = opts.seq;
  }
}

const GONE_HINT = 'the VM was unhooked or its connection closed; wait for it to reconnect (server.waitForVm) and map again';

/** The VM's connection is gone (or going): every pending and later request fails with this. */
export class VmGoneError extends KvmmemError {
  /** Why the connection ended, e.g. 'unhooked by the host', 'connection closed by the host'. */
  readonly reason: string;

  constructor(reason: string, opts: { vm?: string; syscall?: string; cause?: unknown } = {}) {
    super(`${opts.syscall === undefined ? '' : `${opts.syscall}: `}VM ${opts.vm === undefined ? '' : `${opts.vm} `}is gone (${reason})`, {
      code: 'VM_GONE', hint: GONE_HINT,
      ...(opts.syscall === undefined ? {} : { syscall: opts.syscall }),
      ...(opts.cause === undefined ? {} : { cause: opts.cause }),
    });
    this.reason = reason;
  }
}

/** A handshake or framing violation by the peer; the connection is closed when this is raised. */
export class ProtocolError extends KvmmemError {
  readonly reason: string;

  constructor(reason: string, opts: { cause?: unknown; hint?: string; code?: string } = {}) {
    super(`KVMI protocol violation: ${reason}`, {
      code: opts.code ?? 'ERR_KVMI_PROTOCOL',
      ...(opts.hint === undefined ? {} : { hint: opts.hint }),
      ...(opts.cause === undefined ? {} : { cause: opts.cause }),
    });
    this.reason = reason;
  }
}

/**
 * The per-connection bounds (see ChannelLimits in vm.ts), and the server's
 * maxHandshakes ('handshakes'). Going over any of them closes that
 * connection, and only that one.
 */
export type ChannelLimitName = 'message' | 'readBuffer' | 'writeQueue' | 'writeStall' | 'handshakes';

const LIMIT_HINTS: Readonly<Record<ChannelLimitName, string>> = {
  message: 'the peer sent a message larger than KVMI allows (limits.maxMessageBytes)',
  readBuffer: 'the peer sent more than limits.maxReadBufferBytes that could not be processed yet',
  writeQueue: 'more than limits.maxWriteQueueBytes of replies and requests are waiting for the peer to read them',
  writeStall: 'the peer did not read the replies queued for it (over limits.writeHighWaterBytes) for limits.writeStallMs',
  handshakes: 'too many connections were in the handshake at once (the server\'s maxHandshakes): slow or idle peers hold them until handshakeTimeoutMs',
};

/** A peer went over a per-connection bound; that connection was closed (code 'ERR_KVMI_LIMIT'). */
export class ChannelLimitError extends ProtocolError {
  /** Which bound. */
  readonly limit: ChannelLimitName;
  /** What was reached and the bound (bytes; ms for 'writeStall'). */
  readonly value: number;
  readonly max: number;

  constructor(limit: ChannelLimitName, value: number, max: number, what: string) {
    super(`${limit} limit exceeded: ${what}`, { code: 'ERR_KVMI_LIMIT', hint: LIMIT_HINTS[limit] });
    this.limit = limit;
    this.value = value;
    this.max = max;
  }
}

/**
 * The tool refused a peer before answering its handshake: 'EACCES' for unix
 * peer credentials outside allowUids, 'EEXIST' for a VM whose UUID is
 * already connected.
 */
export class PeerRefusedError extends KvmmemError {
  readonly reason: string;

  constructor(reason: string, code: 'EACCES' | 'EEXIST', hint: string) {
    super(`connection refused: ${reason}`, { code, errno: -ERRNO[code]!, hint });
    this.reason = reason;
  }
}

/** Something did not happen in time (a reply, a handshake, a VM connecting). */
export class TimeoutError extends KvmmemError {
  readonly timeoutMs: number;

  constructor(what: string, timeoutMs: number, opts: { syscall?: string; hint?: string } = {}) {
    super(`${what} timed out after ${timeoutMs} ms`, {
      code: 'ETIMEDOUT', errno: -ERRNO.ETIMEDOUT!,
      ...(opts.syscall === undefined ? {} : { syscall: opts.syscall }),
      ...(opts.hint === undefined ? {} : { hint: opts.hint }),
    });
    this.timeoutMs = timeoutMs;
  }
}

/** The server was closed while something was waiting on it. */
export class ServerClosedError extends KvmmemError {
  constructor(what: string) {
    super(`${what}: the introspection server is closed`, { code: 'ERR_SERVER_CLOSED' });
  }
}
