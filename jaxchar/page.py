"""The page `jaxchar serve` shows at `/`: a prompt, temperature and length; the text as it
arrives (server-sent events read from a streaming fetch); the run's loss curve and latest
training samples, refreshed every few seconds. One file, no outside scripts or fonts."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>jaxchar</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem;
         padding: 0 1rem; color: #1d232a; }
  h1 { font-size: 1.3rem; margin-bottom: .2rem; }
  #model { color: #5a6470; margin-bottom: 1rem; }
  textarea { width: 100%; height: 5rem; font: 14px ui-monospace, monospace; }
  label { margin-right: 1rem; }
  input[type=number] { width: 5rem; }
  button { padding: .35rem 1.1rem; }
  pre { white-space: pre-wrap; background: #f4f6f8; padding: .8rem; border-radius: 4px;
        font: 14px/1.4 ui-monospace, monospace; min-height: 3rem; }
  #output .prompt { color: #8a94a0; }
  #error { color: #b3261e; }
  svg { background: #f4f6f8; border-radius: 4px; }
  .train { stroke: #2f6fb2; } .val { stroke: #c0562a; }
  .legend span { margin-right: 1rem; font-weight: 600; }
  .legend .train { color: #2f6fb2; } .legend .val { color: #c0562a; }
  .tick { stroke: #ccc; } .axis { font-size: 11px; fill: #5a6470; }
</style>
</head>
<body>
<h1>jaxchar</h1>
<div id="model">loading the model ...</div>
<form id="form">
  <textarea id="prompt" placeholder="a prompt (empty: a window of the training text)"></textarea>
  <p>
    <label>temperature <input id="temperature" type="number" min="0" max="5" step="0.05"
      value="0.8"></label>
    <label>length <input id="length" type="number" min="1" max="2000" value="300"></label>
    <label>seed <input id="seed" type="number" min="0" placeholder="random"></label>
    <button id="go" type="submit">Generate</button>
  </p>
</form>
<div id="error"></div>
<pre id="output"></pre>
<h2>Loss</h2>
<div class="legend"><span class="train">&#9473; train</span><span class="val">&#9473; held-out
</span> loss (nats/char) against training step</div>
<svg id="curve" width="720" height="220" viewBox="0 0 720 220"></svg>
<h2>Latest training samples</h2>
<pre id="samples"></pre>
<script>
const $ = (id) => document.getElementById(id);

async function loadModel() {
  const r = await fetch("/v1/model");
  const m = await r.json();
  const loss = m.losses.val_loss ?? m.losses.train_loss;
  $("model").textContent = `${m.run}: checkpoint step ${m.step}, ${m.config.model.layers} x ` +
    `LSTM-${m.config.model.hidden}, ${m.vocab_size} characters, ${m.mode} generation` +
    (loss !== undefined ? `, loss ${loss.toFixed(4)} nats/char` : "");
  $("length").max = m.max_length;
}

function drawCurve(records) {
  const svg = $("curve"), W = 720, H = 220, pad = 44;
  const pts = (key) => records.filter((r) => r[key] !== undefined).map((r) => [r.step, r[key]]);
  const series = [["train", pts("train_loss")], ["val", pts("val_loss")]];
  const all = series.flatMap(([, p]) => p);
  if (!all.length) { svg.innerHTML = ""; return; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-3);
  const sx = (x) => pad + (x - x0) / (x1 - x0) * (W - 2 * pad);
  const sy = (y) => H - pad - (y - y0) / (y1 - y0) * (H - 2 * pad);
  // axes with five ticks each: steps along x, nats/char up y
  let out = `<line x1="${pad}" y1="${H - pad}" x2="${W - pad}" y2="${H - pad}" stroke="#999"/>` +
    `<line x1="${pad}" y1="${pad}" x2="${pad}" y2="${H - pad}" stroke="#999"/>`;
  for (let i = 0; i <= 4; i++) {
    const x = x0 + (x1 - x0) * i / 4, y = y0 + (y1 - y0) * i / 4;
    out += `<line class="tick" x1="${sx(x)}" y1="${pad}" x2="${sx(x)}" y2="${H - pad}"/>` +
      `<text class="axis x-tick" x="${sx(x)}" y="${H - pad + 14}" text-anchor="middle">` +
      `${Math.round(x)}</text>` +
      `<line class="tick" x1="${pad}" y1="${sy(y)}" x2="${W - pad}" y2="${sy(y)}"/>` +
      `<text class="axis y-tick" x="${pad - 4}" y="${sy(y) + 4}" text-anchor="end">` +
      `${y.toFixed(2)}</text>`;
  }
  out += `<text class="axis" x="${W / 2}" y="${H - 4}" text-anchor="middle">step</text>` +
    `<text class="axis" x="4" y="${pad - 12}">nats/char</text>`;
  for (const [cls, p] of series) {
    if (!p.length) continue;
    const d = p.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
    out += `<polyline class="${cls}" fill="none" stroke-width="2" points="${d}"/>`;
  }
  svg.innerHTML = out;
}

async function refresh() {
  try {
    const r = await fetch("/v1/metrics");
    const m = await r.json();
    drawCurve(m.metrics);
    $("samples").textContent = m.samples || "(none yet)";
  } catch (e) { /* the next refresh tries again */ }
}

async function generate(event) {
  event.preventDefault();
  $("error").textContent = "";
  const out = $("output");
  out.innerHTML = "";
  const body = { stream: true, temperature: Number($("temperature").value),
                 length: Number($("length").value) };
  if ($("prompt").value) body.prompt = $("prompt").value;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  $("go").disabled = true;
  try {
    const r = await fetch("/v1/generate", { method: "POST", body: JSON.stringify(body),
      headers: { "content-type": "application/json" } });
    if (!r.ok) { $("error").textContent = (await r.json()).error; return; }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\\n").filter((l) => l.startsWith("data: "))
          .map((l) => l.slice(6)).join("\\n");
        if (!data) continue;
        const msg = JSON.parse(data);
        if (block.startsWith("event: done")) {
          out.dataset.done = "1";
          out.title = `seed ${msg.seed}`;
          continue;
        }
        out.appendChild(document.createTextNode(msg.text));
      }
    }
  } catch (e) {
    $("error").textContent = String(e);
  } finally {
    $("go").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
loadModel();
refresh();
setInterval(refresh, 5000);
</script>
</body>
</html>
"""
