// The playground: generate two images with /v1/generate, store the rater's choice with /v1/preferences.
(() => {
  "use strict";
  const KEY = "scoreaction_api_key";
  const RATER = "scoreaction_rater";
  const PROMPTS = [
    ...Array.from({ length: 10 }, (_, d) => `a handwritten digit ${d}`),
    "a photo of a cat", "a watercolor painting of a lighthouse", "a red bicycle leaning on a wall",
  ];
  const CHOICES = { a: "a", b: "b", tie: "tie", both_bad: "both_bad" };
  const KEYS = {
    ArrowLeft: "a", 1: "a", a: "a", ArrowRight: "b", 2: "b", b: "b",
    t: "tie", 3: "tie", ArrowUp: "tie", x: "both_bad", 4: "both_bad", ArrowDown: "both_bad",
  };
  const $ = (id) => document.getElementById(id);
  let pair = null; // {prompt, params, a: {model, seed}, b: {model, seed}}
  let busy = false;

  function setState(state) { document.body.dataset.state = state; }
  function status(text, error = false) {
    $("status").textContent = text;
    $("status").className = error ? "error" : "";
  }
  function headers(json) {
    const h = {};
    const key = sessionStorage.getItem(KEY);
    if (key) h.Authorization = `Bearer ${key}`;
    if (json) h["Content-Type"] = "application/json";
    return h;
  }
  async function api(method, path, body) {
    const r = await fetch(path, { method, headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body) });
    if (r.status === 401) {
      $("key-form").hidden = false;
      $("key").focus();
      throw new Error("this service needs its API key: enter it above");
    }
    if (!r.ok) {
      let msg = `${r.status}`;
      try { msg = `${r.status}: ${(await r.json()).error.message}`; } catch (_) { /* not JSON */ }
      throw new Error(msg);
    }
    return r;
  }
  function seed() { return crypto.getRandomValues(new Uint32Array(1))[0]; }
  function params() {
    return {
      num_inference_steps: Number($("steps").value),
      guidance_scale: Number($("guidance").value),
      eta: Number($("eta").value),
    };
  }
  function setBusy(value) {
    busy = value;
    for (const b of document.querySelectorAll("#choices button, #new-pair")) b.disabled = value;
  }

  async function refreshCount() {
    const r = await api("GET", "/v1/preferences?limit=0");
    $("count").textContent = r.headers.get("X-Total-Count") ?? "?";
  }

  async function loadModels() {
    const data = await (await api("GET", "/v1/models")).json();
    const ids = data.data.filter((m) => m.available !== false).map((m) => m.id);
    for (const [sel, pick] of [["model-a", data.default], ["model-b", ids[ids.length - 1]]]) {
      const el = $(sel);
      el.innerHTML = "";
      for (const id of ids) el.add(new Option(id, id, false, id === pick));
    }
  }

  async function draw(model, s, prompt, p) {
    const body = { prompt, model, seed: s, n: 1, ...p };
    const out = await (await api("POST", "/v1/generate", body)).json();
    return { model: out.model, seed: out.seed, src: `data:image/png;base64,${out.images[0].b64_png}` };
  }

  async function newPair() {
    if (busy) return;
    setBusy(true);
    setState("loading");
    status("drawing two images ...");
    for (const f of document.querySelectorAll("figure")) f.classList.remove("picked");
    try {
      if ($("random-prompt").checked) $("prompt").value = PROMPTS[seed() % PROMPTS.length];
      const prompt = $("prompt").value.trim();
      if (!prompt) throw new Error("type a prompt first");
      const p = params();
      let models = [$("model-a").value, $("model-b").value];
      if (seed() % 2) models = [models[1], models[0]]; // left/right at random: no position bias
      const s = seed();
      const seeds = models[0] === models[1] ? [s, (s + 1 + (seed() % 1000)) >>> 0] : [s, s];
      const [a, b] = await Promise.all([draw(models[0], seeds[0], prompt, p), draw(models[1], seeds[1], prompt, p)]);
      pair = { prompt, params: p, a: { model: a.model, seed: a.seed }, b: { model: b.model, seed: b.seed } };
      $("img-a").src = a.src;
      $("img-b").src = b.src;
      $("cap-a").textContent = `${a.model} #${a.seed}`;
      $("cap-b").textContent = `${b.model} #${b.seed}`;
      showModels();
      setState("ready");
      status("which is better? click, or press \u2190 / \u2192, T for a tie, X if both are bad");
    } catch (e) {
      pair = null;
      setState("error");
      status(e.message, true);
    } finally {
      setBusy(false);
    }
  }

  async function choose(choice) {
    if (busy || !pair || !(choice in CHOICES)) return;
    setBusy(true);
    setState("saving");
    const rater = $("rater").value.trim();
    if (rater) localStorage.setItem(RATER, rater);
    const body = { prompt: pair.prompt, a: pair.a, b: pair.b, choice, ...pair.params };
    if (rater) body.rater = rater;
    try {
      const out = await (await api("POST", "/v1/preferences", body)).json();
      $("count").textContent = String(out.count);
      if (choice === "a" || choice === "b") $(`img-${choice}`).parentElement.classList.add("picked");
      status(`stored #${out.id} (${choice})`);
      pair = null;
      setBusy(false);
      await newPair();
    } catch (e) {
      setState("error");
      status(e.message, true);
      setBusy(false);
    }
  }

  function showModels() {
    for (const id of ["cap-a", "cap-b"]) $(id).hidden = !$("reveal").checked;
  }

  async function start() {
    try {
      await loadModels();
      await refreshCount();
      $("key-form").hidden = true;
      await newPair();
    } catch (e) {
      setState("error");
      status(e.message, true);
    }
  }

  for (const p of PROMPTS) $("prompts").append(new Option(p));
  $("rater").value = localStorage.getItem(RATER) ?? "";
  $("reveal").addEventListener("change", showModels);
  $("new-pair").addEventListener("click", newPair);
  for (const b of document.querySelectorAll("#choices button")) {
    b.addEventListener("click", () => choose(b.dataset.choice));
  }
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    start();
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.target instanceof HTMLInputElement || ev.target instanceof HTMLSelectElement) return;
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.key === "n" || ev.key === "N") { ev.preventDefault(); newPair(); return; }
    const choice = KEYS[ev.key];
    if (choice) { ev.preventDefault(); choose(choice); }
  });
  start();
})();
