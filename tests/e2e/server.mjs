// The OAuth2 server the end-to-end tests talk to: oauth2-mock-server 8.2.3, with
// short-lived tokens and faults on demand. tests/conftest.py starts it.
//
//   node server.mjs [--port N] [--lifetime SECONDS]
//
// Listens on 127.0.0.1 (port 0, the default, lets the OS choose) and prints one
// line, "listening http://127.0.0.1:PORT", once it accepts connections. Issued
// tokens live --lifetime seconds (default 5): the JWT's exp is iat + lifetime
// and the token response's expires_in is the lifetime.
//
// Commands on standard input, one a line, each answered "ok <command>" on
// standard output once in effect (anything else is answered "error <line>"):
//   lifetime SECONDS        tokens issued from now on live this long
//   opaque on|off           issue opaque access tokens (random, no JWT) instead of JWTs
//   fail N http500          the next N token requests answer HTTP 500 server_error
//   fail N invalid_grant    the next N token requests answer HTTP 400 invalid_grant
// The end of standard input stops the server, and the process exits.
import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { OAuth2Server } from 'oauth2-mock-server';

const FAULTS = {
  http500: { statusCode: 500, body: { error: 'server_error' } },
  invalid_grant: {
    statusCode: 400,
    body: { error: 'invalid_grant', error_description: 'injected by the test' },
  },
};

function seconds(text) {
  const value = Number(text);
  if (!Number.isFinite(value) || value <= 0) throw new Error(`not a positive number: ${text}`);
  return value;
}

const { values } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    lifetime: { type: 'string', default: '5' },
  },
});
let lifetime = seconds(values.lifetime);
let opaque = false;
const faults = []; // how the next token requests are answered, first first

const server = new OAuth2Server();
await server.issuer.keys.generate('RS256');
server.service.on('beforeTokenSigning', (token) => {
  token.payload.exp = token.payload.iat + lifetime;
});
server.service.on('beforeResponse', (response) => {
  const fault = faults.shift();
  if (fault === undefined) {
    response.body.expires_in = lifetime;
    if (opaque) response.body.access_token = randomBytes(24).toString('base64url');
  } else {
    response.statusCode = fault.statusCode;
    response.body = fault.body;
  }
});

await server.start(Number(values.port), '127.0.0.1');
// The library names 127.0.0.1 "localhost", which may resolve to ::1 first; keep
// the address we listen on, for discovery and for the tokens' iss claim.
server.issuer.url = `http://127.0.0.1:${server.address().port}`;
console.log(`listening ${server.issuer.url}`);

function obey(line) {
  const words = line.trim().split(/\s+/);
  if (words[0] === 'lifetime' && words.length === 2) {
    lifetime = seconds(words[1]);
  } else if (words[0] === 'opaque' && words.length === 2 && ['on', 'off'].includes(words[1])) {
    opaque = words[1] === 'on';
  } else if (words[0] === 'fail' && words.length === 3 && words[2] in FAULTS) {
    const count = Number(words[1]);
    if (!Number.isInteger(count) || count < 0) throw new Error(`not a count: ${words[1]}`);
    for (let i = 0; i < count; i += 1) faults.push(FAULTS[words[2]]);
  } else {
    throw new Error('unknown command');
  }
}

const commands = createInterface({ input: process.stdin });
commands.on('line', (line) => {
  try {
    obey(line);
    console.log(`ok ${line.trim()}`);
  } catch (error) {
    console.log(`error ${line.trim()}: ${error.message}`);
  }
});
commands.on('close', async () => {
  await server.stop();
  process.exit(0);
});
