"""The texts relayd serves on its reserved paths: `/` (the browser page) and `/help`.

The page is one self-contained document: inline CSS and JS, no request to any other origin
(its Content-Security-Policy says so, and tests/test_browser.py checks it in Chromium). It
builds every URL and curl command from `location.origin`, so it works behind any host name,
port or proxy; only the usage text at its foot uses the request's Host.
"""
from __future__ import annotations

import html

from relayd import __version__
from relayd.http import RESERVED_PATHS

# Only this origin: inline code, and fetch/XHR to the relay itself (downloads are blob: links).
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "connect-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'none'")


def help_text(host: bytes) -> bytes:
    h = host.decode("latin-1")
    return f"""relayd {__version__}: one HTTP sender, up to 256 receivers, identical bytes.

Send (the sender waits until n receivers are connected):
  seq 1000000 | curl -T - http://{h}/mypath?n=3
  curl -T ./file.bin http://{h}/mypath?n=3
  curl --data-binary @file -H 'Content-Type: application/json' http://{h}/mypath

Receive (each of the n receivers gets every byte):
  curl http://{h}/mypath?n=3 > out
  curl -OJ http://{h}/mypath        (saves under the sender's Content-Disposition filename)

Rules:
  n: 1..256 (default 1); sender and receivers of a path must agree on n.
  Either side may come first. The path is free again when the transfer ends.
  A second sender, a receiver beyond n, or a receiver of a streaming path: 409.
  A transfer that does not complete ends every receiver's body short (curl exits 18).
  Content-Type, Content-Disposition and X-Piping* headers reach the receivers.

In a browser: http://{h}/ sends text or a file and receives (with progress and sha256).

Reserved paths: / /help /version /health /metrics
""".encode()


def index_page(host: bytes) -> bytes:
    usage = html.escape(help_text(host).decode("latin-1"))
    return (_PAGE.replace("@@CSP@@", CSP)
                 .replace("@@VERSION@@", html.escape(__version__))
                 .replace("@@RESERVED@@", " ".join(p.decode() for p in sorted(RESERVED_PATHS)))
                 .replace("@@USAGE@@", usage)).encode()


# Plain string, not an f-string: the CSS and JS are full of braces.
_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="@@CSP@@">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>relayd</title>
<style>
:root{--fg:#1d2125;--mute:#5f6b76;--line:#d5dbe1;--bg:#f6f8fa;--acc:#0b62c4;--ok:#1a7f37;
  --bad:#c4281c}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);max-width:64rem;
  margin:1.5rem auto;padding:0 1rem}
h1{font-size:1.4rem;margin:0 0 .2rem}h1 small{font-size:.8rem;color:var(--mute);font-weight:400}
h2{font-size:1.1rem;margin:0 0 .6rem}
p.lead{margin:.2rem 0 1rem;color:var(--mute)}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(22rem,1fr));gap:1rem}
section.card{border:1px solid var(--line);border-radius:8px;padding:1rem;background:#fff}
label{display:block;font-size:.85rem;color:var(--mute);margin:.5rem 0 .15rem}
.row{display:flex;gap:.5rem;align-items:flex-end}.row>div{flex:1}.row>div.narrow{flex:0 0 5.5rem}
input[type=text],input[type=number],textarea{width:100%;font:inherit;padding:.35rem .45rem;
  border:1px solid var(--line);border-radius:5px}
textarea{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85rem;min-height:5.5rem;
  resize:vertical}
.kind{display:flex;gap:1rem;margin:.6rem 0 .1rem}
.kind label{display:inline;margin:0;color:var(--fg);font-size:.95rem}
button{font:inherit;padding:.4rem 1rem;border-radius:5px;border:1px solid var(--acc);
  background:var(--acc);color:#fff;cursor:pointer;margin-top:.7rem}
button.second{background:#fff;color:var(--acc)}button:disabled{opacity:.45;cursor:default}
progress{width:100%;height:1rem;margin-top:.7rem}
.stats{font-size:.85rem;color:var(--mute);min-height:1.2em;font-variant-numeric:tabular-nums}
.status{font-size:.9rem;min-height:1.3em;margin-top:.3rem}
.status.ok{color:var(--ok)}
.status.bad{color:var(--bad)}
pre{background:var(--bg);border:1px solid var(--line);border-radius:5px;padding:.5rem .6rem;
  overflow-x:auto;font-size:.8rem;margin:.3rem 0;white-space:pre-wrap;word-break:break-all}
.cmd{position:relative}
.cmd pre{padding-right:4.2rem}
.cmd button{position:absolute;top:0;right:.3rem;margin-top:.3rem;padding:.1rem .5rem;
  font-size:.75rem}
.hash{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.8rem;word-break:break-all}
.hidden{display:none}
a.save{display:inline-block;margin-top:.5rem}
details{margin-top:1.2rem}summary{cursor:pointer;color:var(--mute)}
</style></head>
<body>
<h1>relayd <small>@@VERSION@@</small></h1>
<p class="lead">An HTTP pipe: one sender streams once, up to 256 receivers get the identical bytes.
Pick a path and <b>n</b> (how many receivers); either side may start first. Nothing is stored.</p>
<div class="grid">

<section class="card" id="send">
<h2>Send</h2>
<div class="row">
 <div><label for="send-path">path</label>
  <input type="text" id="send-path" spellcheck="false" autocomplete="off"></div>
 <div class="narrow"><label for="send-n">n</label>
  <input type="number" id="send-n" min="1" max="256" value="1"></div>
</div>
<div class="kind" role="radiogroup">
 <label><input type="radio" name="send-kind" id="send-kind-text" value="text" checked> text</label>
 <label><input type="radio" name="send-kind" id="send-kind-file" value="file"> file</label>
</div>
<div id="send-text-box"><label for="send-text">text</label>
 <textarea id="send-text" spellcheck="false">hello from the browser</textarea></div>
<div id="send-file-box" class="hidden"><label for="send-file">file</label>
 <input type="file" id="send-file"></div>
<button id="send-start">Send</button>
<button id="send-cancel" class="second" disabled>Cancel</button>
<progress id="send-progress" max="100" value="0"></progress>
<div class="stats" id="send-stats"></div>
<div class="status" id="send-status"></div>
<pre id="send-log" class="hidden"></pre>
<div class="stats">sha256 of what is sent: <span class="hash" id="send-sha256"></span></div>
<label>the same with curl</label>
<div class="cmd"><pre id="send-curl"></pre>
 <button class="second copy" data-for="send-curl">copy</button></div>
</section>

<section class="card" id="receive">
<h2>Receive</h2>
<div class="row">
 <div><label for="recv-path">path</label>
  <input type="text" id="recv-path" spellcheck="false" autocomplete="off"></div>
 <div class="narrow"><label for="recv-n">n</label>
  <input type="number" id="recv-n" min="1" max="256" value="1"></div>
</div>
<button id="recv-start">Receive</button>
<button id="recv-cancel" class="second" disabled>Cancel</button>
<progress id="recv-progress" max="100" value="0"></progress>
<div class="stats" id="recv-stats"></div>
<div class="status" id="recv-status"></div>
<a id="recv-save" class="save hidden" href="#">save</a>
<pre id="recv-text" class="hidden"></pre>
<div class="stats">sha256 of what was received: <span class="hash" id="recv-sha256"></span></div>
<label>the same with curl</label>
<div class="cmd"><pre id="recv-curl"></pre>
 <button class="second copy" data-for="recv-curl">copy</button></div>
<label>a link that opens this page ready to receive</label>
<pre id="recv-link"></pre>
</section>
</div>

<details><summary>usage from the command line (also at /help)</summary>
<pre>@@USAGE@@</pre></details>

<script>
"use strict";
(function () {
const $ = (id) => document.getElementById(id);
const RESERVED = "@@RESERVED@@".split(" ");

// ---- SHA-256: crypto.subtle exists only in secure contexts (https, localhost); a relay at
// http://relay:8080 is not one, so a small incremental implementation is the fallback.
const K = new Uint32Array([
 0x428a2f98,0x71374491,0xb5c0fbcf,0xe9b5dba5,0x3956c25b,0x59f111f1,0x923f82a4,0xab1c5ed5,
 0xd807aa98,0x12835b01,0x243185be,0x550c7dc3,0x72be5d74,0x80deb1fe,0x9bdc06a7,0xc19bf174,
 0xe49b69c1,0xefbe4786,0x0fc19dc6,0x240ca1cc,0x2de92c6f,0x4a7484aa,0x5cb0a9dc,0x76f988da,
 0x983e5152,0xa831c66d,0xb00327c8,0xbf597fc7,0xc6e00bf3,0xd5a79147,0x06ca6351,0x14292967,
 0x27b70a85,0x2e1b2138,0x4d2c6dfc,0x53380d13,0x650a7354,0x766a0abb,0x81c2c92e,0x92722c85,
 0xa2bfe8a1,0xa81a664b,0xc24b8b70,0xc76c51a3,0xd192e819,0xd6990624,0xf40e3585,0x106aa070,
 0x19a4c116,0x1e376c08,0x2748774c,0x34b0bcb5,0x391c0cb3,0x4ed8aa4a,0x5b9cca4f,0x682e6ff3,
 0x748f82ee,0x78a5636f,0x84c87814,0x8cc70208,0x90befffa,0xa4506ceb,0xbef9a3f7,0xc67178f2]);
class Sha256 {
  constructor() {
    this.h = new Uint32Array([0x6a09e667,0xbb67ae85,0x3c6ef372,0xa54ff53a,
                              0x510e527f,0x9b05688c,0x1f83d9ab,0x5be0cd19]);
    this.buf = new Uint8Array(64); this.used = 0; this.length = 0; this.w = new Uint32Array(64);
  }
  update(data) {
    let i = 0;
    this.length += data.length;
    if (this.used) {
      const take = Math.min(64 - this.used, data.length);
      this.buf.set(data.subarray(0, take), this.used);
      this.used += take; i = take;
      if (this.used === 64) { this.block(this.buf, 0); this.used = 0; }
    }
    for (; i + 64 <= data.length; i += 64) this.block(data, i);
    if (i < data.length) { this.buf.set(data.subarray(i), 0); this.used = data.length - i; }
    return this;
  }
  block(b, o) {
    const w = this.w, H = this.h;
    const ror = (x, n) => (x >>> n) | (x << (32 - n));
    for (let t = 0; t < 16; t++, o += 4) {
      w[t] = (b[o] << 24) | (b[o+1] << 16) | (b[o+2] << 8) | b[o+3];
    }
    for (let t = 16; t < 64; t++) {
      const x = w[t-15], y = w[t-2];
      w[t] = w[t-16] + (ror(x,7) ^ ror(x,18) ^ (x >>> 3)) +
             w[t-7] + (ror(y,17) ^ ror(y,19) ^ (y >>> 10));
    }
    let a = H[0], c1 = H[1], c2 = H[2], d = H[3], e = H[4], f = H[5], g = H[6], h = H[7];
    for (let t = 0; t < 64; t++) {
      const t1 = (h + (ror(e,6) ^ ror(e,11) ^ ror(e,25)) + ((e & f) ^ (~e & g)) + K[t] + w[t]) | 0;
      const t2 = ((ror(a,2) ^ ror(a,13) ^ ror(a,22)) + ((a & c1) ^ (a & c2) ^ (c1 & c2))) | 0;
      h = g; g = f; f = e; e = (d + t1) | 0; d = c2; c2 = c1; c1 = a; a = (t1 + t2) | 0;
    }
    H[0] += a; H[1] += c1; H[2] += c2; H[3] += d; H[4] += e; H[5] += f; H[6] += g; H[7] += h;
  }
  hex() {
    const bits = this.length * 8;
    const pad = new Uint8Array((this.used < 56 ? 56 : 120) - this.used + 8);
    pad[0] = 0x80;
    const v = new DataView(pad.buffer);
    v.setUint32(pad.length - 8, Math.floor(bits / 4294967296));
    v.setUint32(pad.length - 4, bits >>> 0);
    this.update(pad);
    return Array.from(this.h, (x) => x.toString(16).padStart(8, "0")).join("");
  }
}
function sha256js(bytes) { return new Sha256().update(bytes).hex(); }
async function sha256(blob) {
  const buffer = await blob.arrayBuffer();
  if (window.crypto && crypto.subtle) {
    const d = new Uint8Array(await crypto.subtle.digest("SHA-256", buffer));
    return Array.from(d, (x) => x.toString(16).padStart(2, "0")).join("");
  }
  return sha256js(new Uint8Array(buffer));
}
window.relaydSha256 = sha256js;   // for tests: the fallback, checked against Python's hashlib

// ---- formatting
function size(b) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return (i ? b.toFixed(b < 10 ? 2 : 1) : String(b)) + " " + u[i];
}
function stats(done, total, started) {
  const s = (performance.now() - started) / 1000;
  // Below 50 ms a rate is mostly timer noise (and kernel buffering): show none.
  const rate = s >= 0.05 ? "  ·  " + size(Math.round(done / s)) + "/s" : "";
  const pct = total ? " (" + Math.floor(100 * done / total) + "%)" : "";
  return size(done) + (total ? " of " + size(total) : "") + pct + rate +
    "  ·  " + s.toFixed(s < 10 ? 2 : 1) + " s";
}
function setStatus(id, text, kind) {
  const el = $(id);
  el.textContent = text;
  el.className = "status " + (kind || "");
}
function setProgress(id, done, total) {
  const p = $(id);
  if (total) { p.max = total; p.value = done; } else { p.removeAttribute("value"); }
}
function finishProgress(id, total) { const p = $(id); p.max = total || 1; p.value = total || 1; }
function shq(s) { return "'" + String(s).replace(/'/g, "'\\''") + "'"; }

// ---- paths: raw bytes on the relay; here each segment is percent-encoded as fetch would.
function pipeUrl(pathText, nText) {
  let p = pathText.trim();
  let extra = "";
  const q = p.indexOf("?");
  if (q >= 0) { extra = p.slice(q + 1); p = p.slice(0, q); }   // e.g. a signed URL's query
  if (!p.startsWith("/")) p = "/" + p;
  if (RESERVED.includes(p)) throw new Error(p + " is reserved; choose another path");
  const n = Number(nText);
  if (!Number.isInteger(n) || n < 1 || n > 256) {
    throw new Error("n must be an integer from 1 to 256");
  }
  const params = new URLSearchParams(extra);
  params.delete("n");
  params.set("n", String(n));
  const path = p.split("/").map(encodeURIComponent).join("/");
  return location.origin + path + "?" + params.toString();
}
function fileName(path) {
  const last = path.split("?")[0].split("/").filter(Boolean).pop();
  return last || "relayd-download";
}
function disposition(name) {
  // A header value is latin-1 bytes: a non-ASCII name travels as RFC 6266 filename*.
  const ascii = name.replace(/[^\x20-\x7e]|["\\]/g, "_");
  if (ascii === name) return 'attachment; filename="' + name + '"';
  return 'attachment; filename="' + ascii + '"; filename*=UTF-8\'\'' +
    encodeURIComponent(name).replace(/'/g, "%27");
}
function dispositionName(header) {
  if (!header) return null;
  const star = /filename\*\s*=\s*UTF-8''([^;]+)/i.exec(header);
  if (star) { try { return decodeURIComponent(star[1].trim()); } catch (e) {} }
  const plain = /filename\s*=\s*"([^"]*)"|filename\s*=\s*([^;]+)/i.exec(header);
  if (!plain) return null;
  const name = (plain[1] !== undefined ? plain[1] : plain[2]).trim();
  return name.replace(/[\/\\]/g, "_") || null;
}

// ---- curl commands: rebuilt on every change so they always match the form
function sendKind() { return $("send-kind-file").checked ? "file" : "text"; }
function updateSendCurl() {
  let url;
  try { url = pipeUrl($("send-path").value, $("send-n").value); }
  catch (e) { $("send-curl").textContent = "# " + e.message; return; }
  if (sendKind() === "file") {
    const f = $("send-file").files[0];
    const name = f ? f.name : "FILE";
    let cmd = "curl -T " + shq(name);
    if (f && f.type) cmd += " -H " + shq("Content-Type: " + f.type);
    cmd += " -H " + shq("Content-Disposition: " + disposition(name));
    $("send-curl").textContent = cmd + " " + shq(url);
  } else {
    $("send-curl").textContent = "printf %s " + shq($("send-text").value) +
      " | curl -T - -H 'Content-Type: text/plain; charset=utf-8' " + shq(url);
  }
}
function updateRecvCurl() {
  let url;
  try { url = pipeUrl($("recv-path").value, $("recv-n").value); }
  catch (e) {
    $("recv-curl").textContent = "# " + e.message;
    $("recv-link").textContent = "";
    return;
  }
  const n = Number($("recv-n").value);
  const out = fileName($("recv-path").value);
  $("recv-curl").textContent = "curl -o " + shq(out) + " " + shq(url) +
    " && sha256sum " + shq(out) +
    (n > 1 ? "\n# each of the " + n + " receivers runs this (or opens this page)" : "");
  const path = $("recv-path").value.trim();
  $("recv-link").textContent = location.origin + "/#receive=" +
    encodeURIComponent(path.startsWith("/") ? path : "/" + path) + "&n=" + n;
}

// ---- send: XMLHttpRequest, whose upload.onprogress counts the bytes the browser sent
let sendXhr = null;
function startSend() {
  let url;
  try { url = pipeUrl($("send-path").value, $("send-n").value); }
  catch (e) { setStatus("send-status", e.message, "bad"); return; }
  let body, total, headers = {};
  if (sendKind() === "file") {
    body = $("send-file").files[0];
    if (!body) { setStatus("send-status", "choose a file first", "bad"); return; }
    total = body.size;
    if (body.type) headers["Content-Type"] = body.type;
    headers["Content-Disposition"] = disposition(body.name);
  } else {
    body = new Blob([$("send-text").value], {type: "text/plain; charset=utf-8"});
    total = body.size;
    headers["Content-Type"] = "text/plain; charset=utf-8";
  }
  $("send-sha256").textContent = "…";
  sha256(body).then((h) => { $("send-sha256").textContent = h; },
                    (e) => { $("send-sha256").textContent = "(" + e.message + ")"; });
  const xhr = new XMLHttpRequest();
  sendXhr = xhr;
  // Until the relay says "Start sending", the bytes counted are only buffered by the kernel
  // (the relay does not read a waiting sender): the clock starts then, and the final rate is
  // the whole body over the time until the relay reports every receiver served.
  let started = performance.now(), flowing = false, uploaded = 0;
  const show = () => {
    setProgress("send-progress", uploaded, total);
    $("send-stats").textContent = stats(uploaded, total, started) +
      (flowing ? "" : "  ·  buffered, waiting for the receivers");
  };
  xhr.open("PUT", url);
  for (const k in headers) xhr.setRequestHeader(k, headers[k]);
  xhr.upload.onprogress = (ev) => { uploaded = ev.loaded; show(); };
  xhr.upload.onload = () => { uploaded = total; show(); };
  xhr.onprogress = () => {
    showLog(xhr.responseText);
    if (!flowing && /Start sending/.test(xhr.responseText)) {
      flowing = true; started = performance.now(); show();
    }
  };
  xhr.onload = () => {
    showLog(xhr.responseText);
    const text = xhr.responseText;
    sendXhr = null; sendButtons(false);
    if (xhr.status === 200 && !/\[ERROR\]/.test(text)) {
      flowing = true; uploaded = total;
      finishProgress("send-progress", total);
      $("send-stats").textContent = stats(total, total, started);
      setStatus("send-status", "sent " + size(total) + ": " + lastLine(text), "ok");
      $("send").dataset.state = "done";
    } else {
      setStatus("send-status", "failed (HTTP " + xhr.status + "): " + lastLine(text), "bad");
      $("send").dataset.state = "failed";
    }
  };
  xhr.onerror = () => {
    sendXhr = null; sendButtons(false);
    setStatus("send-status", "failed after " + size(uploaded) + ": the connection broke", "bad");
    $("send").dataset.state = "failed";
  };
  xhr.onabort = () => {
    sendXhr = null; sendButtons(false);
    setStatus("send-status", "cancelled after " + size(uploaded), "bad");
    $("send").dataset.state = "cancelled";
  };
  $("send-progress").value = 0;
  $("send-log").textContent = ""; $("send-log").classList.add("hidden");
  $("send").dataset.state = "sending";
  setStatus("send-status", "connecting…");
  sendButtons(true);
  xhr.send(body);
}
function lastLine(text) { const l = text.trim().split("\n"); return l[l.length - 1] || ""; }
function showLog(text) {
  if (!text) return;
  $("send-log").textContent = text.trim();
  $("send-log").classList.remove("hidden");
  if ($("send").dataset.state === "sending") setStatus("send-status", lastLine(text));
}
function sendButtons(busy) { $("send-start").disabled = busy; $("send-cancel").disabled = !busy; }

// ---- receive: fetch and a stream reader, so every chunk is counted as it arrives
let recvAbort = null, saveUrl = null;
async function startReceive() {
  let url;
  try { url = pipeUrl($("recv-path").value, $("recv-n").value); }
  catch (e) { setStatus("recv-status", e.message, "bad"); return; }
  recvAbort = new AbortController();
  recvButtons(true);
  if (saveUrl) { URL.revokeObjectURL(saveUrl); saveUrl = null; }
  $("recv-save").classList.add("hidden");
  $("recv-text").classList.add("hidden");
  $("recv-sha256").textContent = "";
  $("recv-stats").textContent = "";
  $("recv-progress").value = 0;
  $("receive").dataset.state = "waiting";
  setStatus("recv-status", "waiting for the sender (and the other receivers)…");
  let received = 0;
  try {
    const r = await fetch(url, {signal: recvAbort.signal, cache: "no-store"});
    if (!r.ok) {
      const text = await r.text();
      throw new Error("HTTP " + r.status + ": " + lastLine(text));
    }
    const length = r.headers.get("Content-Length");
    const total = length === null ? 0 : Number(length);
    const type = r.headers.get("Content-Type") || "application/octet-stream";
    const name = dispositionName(r.headers.get("Content-Disposition")) ||
      fileName($("recv-path").value);
    $("receive").dataset.state = "receiving";
    setStatus("recv-status", "receiving…");
    const started = performance.now();
    const reader = r.body.getReader();
    const chunks = [];
    let shown = 0;
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      chunks.push(value);
      received += value.length;
      const now = performance.now();
      if (now - shown > 50) {       // repaint at most 20 times a second
        shown = now;
        setProgress("recv-progress", received, total);
        $("recv-stats").textContent = stats(received, total, started);
      }
    }
    if (total && received !== total) throw new Error("body ended short");
    finishProgress("recv-progress", received);
    $("recv-stats").textContent = stats(received, received, started);
    const blob = new Blob(chunks, {type: type});
    $("recv-sha256").textContent = await sha256(blob);
    saveUrl = URL.createObjectURL(blob);
    const a = $("recv-save");
    a.href = saveUrl; a.download = name;
    a.textContent = "save " + name + " (" + size(received) + ") again";
    a.classList.remove("hidden");
    if (/^text\//.test(type) && received <= 65536) {
      $("recv-text").textContent = new TextDecoder().decode(await blob.arrayBuffer());
      $("recv-text").classList.remove("hidden");
    }
    setStatus("recv-status", "received " + size(received) + " as " + name, "ok");
    $("receive").dataset.state = "done";
    a.click();                      // the download; the link stays for another copy
  } catch (e) {
    const why = e.name === "AbortError" ? "cancelled" :
      (e instanceof TypeError ?
        "the transfer did not complete (sender gone or connection broke)" : e.message);
    setStatus("recv-status", "failed after " + size(received) + ": " + why, "bad");
    $("receive").dataset.state = "failed";
  } finally {
    recvAbort = null; recvButtons(false);
  }
}
function recvButtons(busy) { $("recv-start").disabled = busy; $("recv-cancel").disabled = !busy; }

// ---- wiring
function randomPath() {
  const a = new Uint8Array(4);
  (window.crypto || {getRandomValues: (x) => x.map(() => Math.random() * 256)}).getRandomValues(a);
  return "/" + Array.from(a, (x) => x.toString(36).padStart(2, "0")).join("").slice(0, 6);
}
const initial = randomPath();
$("send-path").value = initial;
$("recv-path").value = initial;
const hash = new URLSearchParams(location.hash.slice(1));
if (hash.get("receive")) {
  $("recv-path").value = hash.get("receive");
  $("recv-n").value = hash.get("n") || "1";
  $("send-path").value = hash.get("receive");
  $("send-n").value = hash.get("n") || "1";
}
function updateKind() {
  $("send-text-box").classList.toggle("hidden", sendKind() !== "text");
  $("send-file-box").classList.toggle("hidden", sendKind() !== "file");
  updateSendCurl();
}
for (const id of ["send-path", "send-n", "send-text", "send-file"]) {
  $(id).addEventListener("input", updateSendCurl);
}
$("send-file").addEventListener("change", updateSendCurl);
$("send-kind-text").addEventListener("change", updateKind);
$("send-kind-file").addEventListener("change", updateKind);
for (const id of ["recv-path", "recv-n"]) $(id).addEventListener("input", updateRecvCurl);
$("send-start").addEventListener("click", startSend);
$("send-cancel").addEventListener("click", () => { if (sendXhr) sendXhr.abort(); });
$("recv-start").addEventListener("click", startReceive);
$("recv-cancel").addEventListener("click", () => { if (recvAbort) recvAbort.abort(); });
for (const b of document.querySelectorAll("button.copy")) {
  b.addEventListener("click", () => {
    const text = $(b.dataset.for).textContent;
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(() => { b.textContent = "copied"; });
    } else {                        // plain http: select it for Ctrl-C
      const range = document.createRange();
      range.selectNodeContents($(b.dataset.for));
      const sel = getSelection(); sel.removeAllRanges(); sel.addRange(range);
      b.textContent = "Ctrl-C";
    }
    setTimeout(() => { b.textContent = "copy"; }, 1500);
  });
}
updateKind();
updateRecvCurl();
if (hash.get("receive") && hash.get("start") === "1") startReceive();
})();
</script>
</body></html>
"""
