// The csm page: lists voices, streams speech as raw PCM into Web Audio while it is made,
// then hands the whole clip to the <audio> element for replay and download.
"use strict";

const RATE = 24000;
const $ = (id) => document.getElementById(id);

function headers(extra = {}) {
  const key = $("key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function say(message, isError = false) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
}

async function failure(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadVoices(selected) {
  const response = await fetch("/v1/audio/voices", { headers: headers() });
  if (!response.ok) return say(await failure(response), true);
  const select = $("voice");
  select.replaceChildren();
  for (const voice of (await response.json()).data) {
    const label = voice.kind === "stored" ? `${voice.name} (uploaded)` : voice.kind === "openai" ? `${voice.name} (${voice.description})` : voice.name;
    select.append(new Option(label, voice.id, false, voice.id === selected));
  }
}

function wavBlob(samples) {
  const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (offset, value) => [...value].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVEfmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, RATE, true); view.setUint32(28, RATE * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, samples.length * 2, true);
  samples.forEach((s, i) => view.setInt16(44 + i * 2, s, true));
  return new Blob([view], { type: "audio/wav" });
}

async function speak() {
  $("speak").disabled = true;
  say("Generating...");
  const body = {
    model: "csm-1b",
    input: $("text").value,
    voice: $("voice").value,
    response_format: "pcm",
    speed: Number($("speed").value) || 1,
    max_audio_seconds: Number($("max-seconds").value) || 30,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const context = new AudioContext({ sampleRate: RATE });
  let playAt = context.currentTime + 0.1;
  const samples = [];
  let carry = new Uint8Array(0);
  try {
    const response = await fetch("/v1/audio/speech", { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await failure(response));
    const reader = response.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      // 16-bit samples may straddle network chunks: keep an odd byte for the next one.
      const bytes = new Uint8Array(carry.length + value.length);
      bytes.set(carry);
      bytes.set(value, carry.length);
      const even = bytes.length - (bytes.length % 2);
      carry = bytes.slice(even);
      const chunk = new Int16Array(bytes.buffer.slice(0, even));
      if (!chunk.length) continue;
      for (const sample of chunk) samples.push(sample);
      const buffer = context.createBuffer(1, chunk.length, RATE);
      buffer.getChannelData(0).set(Float32Array.from(chunk, (s) => s / 32768));
      const source = context.createBufferSource();
      source.buffer = buffer;
      source.connect(context.destination);
      playAt = Math.max(playAt, context.currentTime);
      source.start(playAt);
      playAt += buffer.duration;
      say(`Playing... ${(samples.length / RATE).toFixed(1)} s so far`);
    }
    const url = URL.createObjectURL(wavBlob(samples));
    $("player").src = url;
    $("download").href = url;
    $("download").hidden = false;
    say(`Done: ${(samples.length / RATE).toFixed(2)} s of audio`);
  } catch (error) {
    say(error.message, true);
  } finally {
    $("speak").disabled = false;
  }
}

async function upload(event) {
  event.preventDefault();
  const form = event.target;
  say("Uploading voice...");
  const response = await fetch("/v1/audio/voices", { method: "POST", headers: headers(), body: new FormData(form) });
  if (!response.ok) return say(await failure(response), true);
  const voice = await response.json();
  form.reset();
  await loadVoices(voice.id);
  say(`Voice "${voice.name}" added`);
}

$("speak").addEventListener("click", speak);
$("upload").addEventListener("submit", upload);
$("key").addEventListener("change", () => loadVoices());
loadVoices();
