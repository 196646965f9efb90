#!/usr/bin/env node
// Regenerate tests/data/node_base64url.json from real Node:
//
//     node tests/data/make_node_base64url.js > tests/data/node_base64url.json
//
// Reads nothing; a seeded PRNG makes the output deterministic for a given Node.
// Each case records the input string, the bytes of Buffer.from(input, "base64url")
// and what the seed's decodeJwtPayload returns for `${HEADER}.${input}.sig`
// (JSON has no Infinity, so a non-finite number is written {"$number": "Infinity"}).
"use strict";

const HEADER = "eyJhbGciOiJub25lIn0";

function decodeJwtPayload(token) {
  // The seed's function, verbatim apart from types (jsonParse is JSON.parse).
  const jwt = token.startsWith("sk-ant-si-") ? token.slice("sk-ant-si-".length) : token;
  const parts = jwt.split(".");
  if (parts.length !== 3 || !parts[1]) return null;
  try {
    return JSON.parse(Buffer.from(parts[1], "base64url").toString("utf8"));
  } catch {
    return null;
  }
}

// mulberry32: small, seeded, the same on every platform.
let state = 0x95e18224;
function random() {
  state = (state + 0x6d2b79f5) | 0;
  let t = state;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const randint = (n) => Math.floor(random() * n);
const pick = (items) => items[randint(items.length)];

const STANDARD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URLSAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
// Characters outside both alphabets, including non-ASCII ones whose UTF-16
// low byte is (é, ☃, \u0100, \x00) or is not (\u0141 -> "A", \u2630 -> "0",
// \u263d -> "=", \uff2b -> "+", an emoji's high surrogate \ud83d -> "=")
// a base64 character, and lone surrogates.
const JUNK = [
  " ", "\t", "\n", "\r", "$", ".", "%", "!", "~", "\x00", "\x7f", "é", "ÿ", "☃",
  "\u0100", "\u0141", "\u2630", "\u263d", "\uff2b", "\ufeff", "😀", "🌍", "\u{10041}",
  "\ud800", "\udc3d",
];

const cases = [];
const seen = new Set();
function add(input) {
  if (seen.has(input)) return;
  seen.add(input);
  cases.push({
    input,
    bytes: [...Buffer.from(input, "base64url")],
    payload: decodeJwtPayload(`${HEADER}.${input}.sig`),
  });
}

function tagNonFinite(key, value) {
  return typeof value === "number" && !Number.isFinite(value) ? { $number: String(value) } : value;
}

// Hand-picked edges: lengths 0..8, padding anywhere, both alphabets, junk.
for (const input of [
  "", "Q", "QQ", "QQQ", "QUJD", "QUJDR", "QUJDRA", "QUJDRA=", "QUJDRA==", "QUJDRA===",
  "QUJDRA====", "QUJDREU", "QUJDREU=", "QUJDREU==", "=", "==", "====", "=QUJD", "Q=UJD",
  "QU=JD", "QUJ=D", "QUJD=", "QUJD=QUJD", "QUJD==QUJD", "Q===", "QQ==", "QQ=", "QQQ=",
  "-_-_", "+/+/", "-/+_", "____", "////", "----", "++++", "_-/+=", "a.b$c=junk",
  " Q U J D ", "QU\nJD", "QU\r\nJD", "\tQUJD\t", "QU$JD", "QU%JD", "QU.JD", "QU%3DJD",
  "QUJD%3D", "é", "éQUJD", "QUéJD", "☃QUJD", "QU☃JD", "😀QUJD", "QU😀JD", "QUJD😀",
  "🌍QUJD", "\u0100QUJD", "\x00QUJD", "QU\x00JD", "\u0141\u0141\u0141\u0141",
  "QUJD\u263dQQ", "\ufeffQUJD", "\ud800QUJD", "QUJD\udc3dQUJD", "\u{10041}\u{10041}QUJ",
  "\uff2b\uff2b\uff2b\uff2b", "\u2630\u2630\u2630\u2630",
]) {
  add(input);
}

// Random strings of length 0..20 from weighted pools.
function randomString() {
  const length = randint(21);
  const alphabet = pick([STANDARD, URLSAFE, STANDARD + URLSAFE]);
  const junkRate = pick([0, 0.05, 0.2, 0.5]);
  const padRate = pick([0, 0, 0.03, 0.1]);
  let text = "";
  for (let i = 0; i < length; i++) {
    const roll = random();
    if (roll < padRate) text += "=";
    else if (roll < padRate + junkRate) text += pick(JUNK);
    else text += pick(alphabet);
  }
  return text;
}
while (cases.length < 230) add(randomString());

// Mangled encodings of JSON payloads, so that decodeJwtPayload has something
// to parse: random junk inserted, padding kept or dropped or misplaced.
const PAYLOADS = [
  Buffer.from('{"exp":1800000000}'),
  Buffer.from('{"exp":1800000000.5,"sub":"user"}'),
  Buffer.from('{"exp":-1,"name":"é☃😀"}'),
  Buffer.from('{"sub":"a","iat":0,"exp":0}'),
  Buffer.from('[1,2,3]'),
  Buffer.from('"just a string"'),
  Buffer.from('42'),
  Buffer.from('null'),
  Buffer.from(' {"exp" : 1e3 } \n'),
  Buffer.from('{"exp":"1800000000"}'),
  Buffer.from('{"exp":true}'),
  Buffer.from('{"exp":1e400}'),
  Buffer.from('{"exp":NaN}'),
  Buffer.from('{"exp":1,}'),
  Buffer.from('\ufeff{"exp":1}'),
  Buffer.from('{"a":{"b":[{"c":null}]},"exp":7}'),
  // Invalid UTF-8 inside a JSON string: both sides must substitute U+FFFD alike.
  Buffer.concat([Buffer.from('{"s":"'), Buffer.from([0xf0, 0x9f, 0x98]), Buffer.from('"}')]),
  Buffer.concat([Buffer.from('{"s":"'), Buffer.from([0xed, 0xa0, 0x80]), Buffer.from('"}')]),
  Buffer.concat([Buffer.from('{"s":"'), Buffer.from([0xc0, 0x80, 0xff]), Buffer.from('"}')]),
  Buffer.concat([Buffer.from('{"s":"'), Buffer.from([0xe0, 0x80, 0xaf, 0xf4, 0x90, 0x80, 0x80]), Buffer.from('"}')]),
  Buffer.concat([Buffer.from('{"s":"x'), Buffer.from([0xe2, 0x98]), Buffer.from('","exp":5}')]),
];
const SKIPPED = [" ", "\t", "\n", "$", "%", "!", "é", "☃", "\u0100", "\x00", "🌍", "\ud800"];

function mangle(buffer) {
  const encoded = buffer.toString(pick(["base64", "base64url"]));
  let text = encoded.replace(/=+$/, "");
  const padding = encoded.length - text.length;
  const inserts = pick([0, 0, 1, 3, 8]);
  for (let i = 0; i < inserts; i++) {
    const at = randint(text.length + 1);
    text = text.slice(0, at) + pick(SKIPPED) + text.slice(at);
  }
  switch (randint(4)) {
    case 0: return text;
    case 1: return text + "=".repeat(padding);
    case 2: return text + "=".repeat(randint(4)) + pick(["", "QUJD", "{}", "junk"]);
    default: {
      // An early "=": Node stops there and the JSON is cut short.
      const at = randint(text.length + 1);
      return text.slice(0, at) + "=" + text.slice(at);
    }
  }
}
for (const payload of PAYLOADS) {
  add(payload.toString("base64url"));
  add(payload.toString("base64"));
}
while (cases.length < 310) add(mangle(pick(PAYLOADS)));

// One case per line, so that a regenerated table diffs readably.
const lines = cases.map((item) => "  " + JSON.stringify(item, tagNonFinite));
process.stdout.write(
  `{"node": ${JSON.stringify(process.version)}, "header": ${JSON.stringify(HEADER)}, "cases": [\n` +
    lines.join(",\n") +
    "\n]}\n",
);
