// A small Audience client for Node.js: the protos in protos/ loaded at run time with
// @grpc/proto-loader, called through @grpc/grpc-js. Fields keep their proto names
// (`rule_text`, `event_id`), enums are their names (`SEGMENT_STATE_ACTIVE`), int64s are
// strings, and a oneof's set member is named by the oneof (`response.message === 'change'`).

import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

export const PROTOS_DIR = fileURLToPath(new URL('../../protos', import.meta.url));

const SERVICE_FILES = [
  'audience/v1/ingest_service.proto',
  'audience/v1/segment_service.proto',
  'audience/v1/membership_service.proto',
];

const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
};

/** The default deadline of a unary call, in milliseconds. */
export const DEFAULT_DEADLINE_MS = 10_000;

/**
 * Opens one channel to `address` and returns the services on it.
 *
 * When `apiKey` is set, every call carries `authorization: Bearer <apiKey>` (docs/security.md).
 * Per-call metadata rather than call credentials, since grpc-js refuses to compose call
 * credentials with a plaintext channel.
 */
export function openAudience({ address, apiKey, protosDir = PROTOS_DIR }) {
  const definition = protoLoader.loadSync(SERVICE_FILES, {
    ...LOADER_OPTIONS,
    includeDirs: [protosDir],
  });
  const v1 = grpc.loadPackageDefinition(definition).audience.v1;
  const credentials = grpc.credentials.createInsecure();
  const ingest = new v1.IngestService(address, credentials);
  // The other clients share the first one's channel.
  const shared = { channelOverride: ingest.getChannel() };
  const segments = new v1.SegmentService(address, credentials, shared);
  const memberships = new v1.MembershipService(address, credentials, shared);

  const metadata = () => {
    const md = new grpc.Metadata();
    if (apiKey) {
      md.set('authorization', `Bearer ${apiKey}`);
    }
    return md;
  };

  const unary = (client, method, request, deadlineMs = DEFAULT_DEADLINE_MS) =>
    new Promise((resolve, reject) => {
      client[method](
        request,
        metadata(),
        { deadline: Date.now() + deadlineMs },
        (error, response) => (error ? reject(describe(method, error)) : resolve(response)),
      );
    });

  return {
    ingest,
    segments,
    memberships,
    unary,
    /** Starts a server-streaming call; read it with a {@link StreamReader}. */
    stream: (client, method, request) => client[method](request, metadata()),
    close: () => ingest.close(),
  };
}

/** An Error that names the RPC and keeps the gRPC status code and details. */
function describe(method, error) {
  const name = grpc.status[error.code] ?? error.code;
  const described = new Error(`${method} failed: ${name}: ${error.details}`);
  described.code = error.code;
  described.cause = error;
  return described;
}

/** Reads a server stream one message at a time, each wait bounded. */
export class StreamReader {
  #queue = [];
  #waiting = null;
  #ended = null;

  constructor(call) {
    this.call = call;
    call.on('data', (message) => this.#push({ message }));
    call.on('error', (error) => this.#end(error));
    call.on('end', () => this.#end(new Error('the stream ended')));
  }

  #push(item) {
    if (this.#waiting) {
      const { resolve } = this.#waiting;
      this.#waiting = null;
      resolve(item.message);
    } else {
      this.#queue.push(item);
    }
  }

  #end(error) {
    this.#ended ??= error;
    if (this.#waiting) {
      const { reject } = this.#waiting;
      this.#waiting = null;
      reject(this.#ended);
    }
  }

  /** The next message; rejects when the stream fails or ends, or after `timeoutMs`. */
  next(timeoutMs) {
    if (this.#queue.length > 0) {
      return Promise.resolve(this.#queue.shift().message);
    }
    if (this.#ended) {
      return Promise.reject(this.#ended);
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiting = null;
        reject(new Error(`no message within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#waiting = {
        resolve: (message) => {
          clearTimeout(timer);
          resolve(message);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      };
    });
  }

  /** The next message for which `accept` is true, skipping others, within `timeoutMs`. */
  async nextWhere(accept, timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const message = await this.next(Math.max(1, deadline - Date.now()));
      if (accept(message)) {
        return message;
      }
    }
  }

  /** Cancels the call; the CANCELLED status it ends with is expected and swallowed. */
  cancel() {
    this.#ended ??= new Error('cancelled');
    this.call.cancel();
  }
}
