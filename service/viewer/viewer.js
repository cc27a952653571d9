// DermaSeg viewer: sends the chosen photo to POST /segment (this origin only) and draws what comes back.
// The outline is computed from the mask PNG of the answer: the lesion pixels within `outlineWidth` pixels
// of the background (a square erosion), drawn opaque on #overlay at the photo's own resolution.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("service-status"), drop: $("drop"), photo: $("photo"), fileName: $("file-name"),
    keyForm: $("key-form"), apiKey: $("api-key"), keyMessage: $("key-message"),
    threshold: $("threshold"), thresholdValue: $("threshold-value"), thresholdReset: $("threshold-reset"),
    flipTta: $("flip-tta"), largestComponent: $("largest-component"), fillHoles: $("fill-holes"),
    pixelSpacing: $("pixel-spacing"), showOutline: $("show-outline"), showHeat: $("show-heat"),
    error: $("error"), empty: $("empty"), canvases: $("canvases"), busy: $("busy"),
    image: $("image"), heat: $("heat"), overlay: $("overlay"),
    quality: $("quality"), review: $("review"), jaccard: $("estimated-jaccard"), reasons: $("review-reasons"),
    area: $("area"), bbox: $("bbox"), photoSize: $("photo-size"), model: $("model"), requestId: $("request-id"),
    timings: document.querySelector("#timings tbody"), download: $("download"),
  };
  const OUTLINE_RGB = [0, 224, 255];
  const ACCEPTED = "JPEG, PNG, BMP or TIFF";

  // Kept in this closure only: never written to web storage, a cookie or the URL.
  let apiKey = null;
  let file = null;
  let bitmap = null;
  let thresholdTouched = false;
  let sequence = 0;
  let maskBlob = null;
  let debounceTimer = null;

  const setState = (state) => { document.body.dataset.state = state; };

  // --- the service's readiness (open even with API keys) -------------------------------------------
  async function showReadiness() {
    try {
      const response = await fetch("/health/ready", { headers: { Accept: "application/json" } });
      const body = await response.json();
      const model = body.model ? `${body.model.name} ${body.model.version}` : "no model";
      const ready = body.status === "ready";
      ui.status.textContent = ready ? `${model} · ready` : `${model} · not ready: ${body.reason || "unknown"}`;
      ui.status.className = `service-status ${ready ? "ready" : "not-ready"}`;
    } catch (error) {
      ui.status.textContent = "The service cannot be reached.";
      ui.status.className = "service-status not-ready";
    }
  }

  // --- choosing a photo -----------------------------------------------------------------------------
  async function choose(chosen) {
    if (!chosen) return;
    file = chosen;
    ui.fileName.textContent = `${chosen.name} (${formatBytes(chosen.size)})`;
    try {
      bitmap = await createImageBitmap(chosen, { imageOrientation: "from-image" });
    } catch (error) {
      bitmap = null; // e.g. TIFF, which browsers do not show: the outline is drawn on a plain ground
    }
    segment();
  }

  ui.photo.addEventListener("change", () => choose(ui.photo.files[0]));
  ui.drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    ui.drop.classList.add("dragging");
  });
  ui.drop.addEventListener("dragleave", () => ui.drop.classList.remove("dragging"));
  ui.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    ui.drop.classList.remove("dragging");
    if (event.dataTransfer && event.dataTransfer.files.length) choose(event.dataTransfer.files[0]);
  });
  // A photo dropped beside the zone must not make the browser leave the page to show it.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  // --- options ----------------------------------------------------------------------------------------
  function showThreshold() {
    ui.thresholdValue.textContent = thresholdTouched ? Number(ui.threshold.value).toFixed(2) : "model default";
  }
  ui.threshold.addEventListener("input", () => { thresholdTouched = true; showThreshold(); later(); });
  ui.thresholdReset.addEventListener("click", () => { thresholdTouched = false; showThreshold(); later(); });
  for (const box of [ui.flipTta, ui.largestComponent, ui.fillHoles]) box.addEventListener("change", () => segment());
  ui.pixelSpacing.addEventListener("input", () => later());
  ui.showOutline.addEventListener("change", () => { ui.overlay.hidden = !ui.showOutline.checked; });
  ui.showHeat.addEventListener("change", () => { ui.heat.hidden = !ui.showHeat.checked; });
  ui.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = ui.apiKey.value.trim() || null;
    segment();
  });
  ui.download.addEventListener("click", () => {
    if (!maskBlob) return;
    const link = document.createElement("a");
    link.href = URL.createObjectURL(maskBlob);
    link.download = `${(file && file.name ? file.name.replace(/\.[^.]*$/, "") : "photo")}-mask.png`;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  });

  function later() {
    clearTimeout(debounceTimer);
    debounceTimer = setTimeout(segment, 350);
  }

  function query() {
    const params = new URLSearchParams();
    if (thresholdTouched) params.set("threshold", ui.threshold.value);
    if (ui.flipTta.checked) params.set("flip_tta", "true");
    if (ui.largestComponent.checked) params.set("largest_component", "true");
    if (ui.fillHoles.checked) params.set("fill_holes", "true");
    const spacing = Number(ui.pixelSpacing.value);
    if (ui.pixelSpacing.value !== "" && spacing > 0 && spacing <= 100) params.set("pixel_spacing_mm", String(spacing));
    return params.toString();
  }

  // --- asking the service -----------------------------------------------------------------------------
  async function segment() {
    clearTimeout(debounceTimer);
    if (!file) return;
    const mine = ++sequence;
    const form = new FormData();
    form.append("file", file, file.name || "photo");
    const headers = { Accept: "application/json" };
    if (apiKey) headers["X-API-Key"] = apiKey;
    setState("busy");
    ui.busy.hidden = false;
    let response;
    let body = null;
    try {
      const search = query();
      response = await fetch(`/segment${search ? `?${search}` : ""}`, { method: "POST", body: form, headers });
      body = await response.json().catch(() => null);
    } catch (error) {
      if (mine !== sequence) return;
      return fail(0, "network_error", "the service cannot be reached; is it running?");
    }
    if (mine !== sequence) return; // a newer request was sent meanwhile: its answer will be shown
    if (!response.ok) {
      const detail = body && body.error ? body.error : { code: "http_error", message: response.statusText };
      return fail(response.status, detail.code, detail.message);
    }
    ui.keyForm.hidden = apiKey === null;
    ui.keyMessage.textContent = "";
    try {
      await show(body, response.headers.get("Server-Timing"));
    } catch (error) {
      return fail(0, "display_error", `the answer could not be drawn (${error.message})`);
    }
    if (mine === sequence) setState("done");
  }

  function fail(status, code, message) {
    ui.busy.hidden = true;
    if (status === 401) {
      ui.keyForm.hidden = false;
      ui.keyMessage.textContent = apiKey === null ? "" : message;
      ui.error.hidden = true;
      ui.apiKey.focus();
      setState("needs-key");
      return;
    }
    ui.error.textContent = "";
    const title = document.createElement("strong");
    title.textContent = status ? `${status} ${code}` : code;
    ui.error.append(title, document.createTextNode(message + limitHint(status, code, message)));
    ui.error.hidden = false;
    setState("error");
  }

  // What the limit is, in words, for the answers about size and format.
  function limitHint(status, code, message) {
    if (status === 415) return `. Accepted: ${ACCEPTED}, one photo per request.`;
    const bytes = /limit of (\d+) bytes/.exec(message);
    if (status === 413 && bytes) return ` (${formatBytes(Number(bytes[1]))} at most).`;
    const pixels = /limit of (\d+) pixels/.exec(message);
    if (status === 413 && pixels) return ` (${(Number(pixels[1]) / 1e6).toFixed(1)} megapixels at most).`;
    return "";
  }

  // --- drawing the answer -----------------------------------------------------------------------------
  async function show(answer, serverTiming) {
    const { width, height } = answer.image;
    for (const canvas of [ui.image, ui.heat, ui.overlay]) {
      canvas.width = width;
      canvas.height = height;
    }
    const context = ui.image.getContext("2d");
    if (bitmap) {
      context.drawImage(bitmap, 0, 0, width, height);
    } else {
      context.fillStyle = "#66757c";
      context.fillRect(0, 0, width, height);
    }
    const mask = answer.mask_png ? await pngPixels(answer.mask_png, width, height) : null;
    const probability = answer.probability_png ? await pngPixels(answer.probability_png, width, height) : null;
    const outlineWidth = Math.max(1, Math.round(Math.max(width, height) / 400));
    ui.overlay.dataset.outlineWidth = String(outlineWidth);
    drawOutline(mask ? mask.gray : new Uint8ClampedArray(width * height), width, height, outlineWidth);
    drawHeat(probability ? probability.gray : null, width, height);
    maskBlob = mask ? mask.blob : null;
    ui.download.disabled = maskBlob === null;

    ui.empty.hidden = true;
    ui.canvases.hidden = false;
    ui.error.hidden = true;
    ui.busy.hidden = true;
    ui.overlay.hidden = !ui.showOutline.checked;
    ui.heat.hidden = !ui.showHeat.checked;
    // At most 72 % of the window's height, keeping the photo's proportions.
    ui.canvases.style.maxWidth = `min(100%, ${width}px, calc(72vh * ${width / height}))`;

    showNumbers(answer);
    showTimings(serverTiming, answer.timings_ms);
    showQuality(answer.quality);
    if (!thresholdTouched) ui.threshold.value = String(answer.options.threshold);
  }

  // The grayscale values of a base64 PNG (one byte per pixel) and the PNG itself as a Blob.
  async function pngPixels(base64, width, height) {
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const blob = new Blob([bytes], { type: "image/png" });
    const decoded = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    const scratch = document.createElement("canvas");
    scratch.width = width;
    scratch.height = height;
    const context = scratch.getContext("2d", { willReadFrequently: true });
    context.drawImage(decoded, 0, 0);
    const rgba = context.getImageData(0, 0, width, height).data;
    const gray = new Uint8ClampedArray(width * height);
    for (let i = 0; i < gray.length; i++) gray[i] = rgba[4 * i];
    return { gray, blob };
  }

  // Lesion pixels (mask > 127) whose (2r+1)² neighbourhood reaches the background or the photo's edge.
  function outlineOf(gray, width, height, r) {
    const lesion = new Uint8Array(width * height);
    for (let i = 0; i < lesion.length; i++) lesion[i] = gray[i] > 127 ? 1 : 0;
    const span = 2 * r + 1;
    const across = new Uint8Array(width * height); // whole window along the row is lesion
    const sums = new Int32Array(Math.max(width, height) + 1);
    for (let y = 0; y < height; y++) {
      const row = y * width;
      for (let x = 0; x < width; x++) sums[x + 1] = sums[x] + lesion[row + x];
      for (let x = r; x < width - r; x++) across[row + x] = sums[x + r + 1] - sums[x - r] === span ? 1 : 0;
    }
    const outline = new Uint8Array(width * height);
    for (let x = 0; x < width; x++) {
      for (let y = 0; y < height; y++) sums[y + 1] = sums[y] + across[y * width + x];
      for (let y = 0; y < height; y++) {
        const inside = y >= r && y < height - r && sums[y + r + 1] - sums[y - r] === span;
        const i = y * width + x;
        outline[i] = lesion[i] && !inside ? 1 : 0;
      }
    }
    return outline;
  }

  function drawOutline(gray, width, height, r) {
    const outline = outlineOf(gray, width, height, r);
    const context = ui.overlay.getContext("2d");
    const pixels = context.createImageData(width, height);
    for (let i = 0; i < outline.length; i++) {
      if (!outline[i]) continue;
      pixels.data.set(OUTLINE_RGB, 4 * i);
      pixels.data[4 * i + 3] = 255;
    }
    context.putImageData(pixels, 0, 0);
  }

  // The confidence as a heat map: transparent below 5 %, then purple → orange → pale yellow.
  const HEAT_STOPS = [[0, [49, 18, 92]], [0.5, [180, 54, 120]], [0.8, [251, 136, 34]], [1, [252, 253, 191]]];
  const HEAT = new Uint8ClampedArray(256 * 4);
  for (let v = 0; v < 256; v++) {
    const p = v / 255;
    let k = 0;
    while (k < HEAT_STOPS.length - 2 && p > HEAT_STOPS[k + 1][0]) k++;
    const [p0, c0] = HEAT_STOPS[k];
    const [p1, c1] = HEAT_STOPS[k + 1];
    const t = Math.min(1, Math.max(0, (p - p0) / (p1 - p0)));
    for (let c = 0; c < 3; c++) HEAT[4 * v + c] = c0[c] + t * (c1[c] - c0[c]);
    HEAT[4 * v + 3] = p < 0.05 ? 0 : 70 + 130 * p;
  }

  function drawHeat(gray, width, height) {
    const context = ui.heat.getContext("2d");
    context.clearRect(0, 0, width, height);
    ui.showHeat.disabled = gray === null;
    if (!gray) return;
    const pixels = context.createImageData(width, height);
    for (let i = 0; i < gray.length; i++) pixels.data.set(HEAT.subarray(4 * gray[i], 4 * gray[i] + 4), 4 * i);
    context.putImageData(pixels, 0, 0);
  }

  // --- the numbers --------------------------------------------------------------------------------------
  function showNumbers(answer) {
    const lesion = answer.lesion;
    let area = `${lesion.area_px.toLocaleString("en-US")} px · ${(100 * lesion.area_fraction).toFixed(1)} % of the photo`;
    if (lesion.area_mm2 !== null && lesion.area_mm2 !== undefined) area += ` · ${lesion.area_mm2.toFixed(2)} mm²`;
    if (!lesion.found) area += " (no lesion found)";
    ui.area.textContent = area;
    ui.area.dataset.px = String(lesion.area_px);
    const box = lesion.bbox;
    ui.bbox.textContent = box ? `x ${box.x}, y ${box.y} · ${box.width} × ${box.height} px` : "none";
    ui.photoSize.textContent = `${answer.image.width} × ${answer.image.height} px`;
    ui.model.textContent = `${answer.model.name} ${answer.model.version}`;
    ui.requestId.textContent = answer.request_id;
  }

  function showTimings(header, fallback) {
    const rows = [];
    if (header) {
      for (const item of header.split(",")) {
        const [name, ...params] = item.trim().split(";");
        const duration = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
        if (name && duration) rows.push([name, Number(duration.slice(4))]);
      }
    } else if (fallback) {
      rows.push(...Object.entries(fallback));
    }
    ui.timings.textContent = "";
    for (const [name, value] of rows) {
      const row = ui.timings.insertRow();
      if (name === "total") row.className = "total";
      row.insertCell().textContent = name;
      row.insertCell().textContent = value.toFixed(1);
    }
  }

  // The review flag (absent from services older than it): estimated Jaccard, review recommended or not.
  function showQuality(quality) {
    if (!quality) {
      ui.quality.hidden = true;
      return;
    }
    ui.quality.hidden = false;
    ui.quality.classList.toggle("review", Boolean(quality.review_recommended));
    ui.review.textContent = quality.review_recommended ? "⚠ Review recommended" : "✓ No review flag";
    ui.jaccard.textContent = Number(quality.estimated_jaccard).toFixed(2);
    ui.reasons.textContent = "";
    for (const reason of quality.reasons || []) {
      const item = document.createElement("li");
      item.textContent = reason;
      ui.reasons.append(item);
    }
  }

  function formatBytes(bytes) {
    if (bytes >= 1024 * 1024) return `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;
    if (bytes >= 1024) return `${(bytes / 1024).toFixed(0)} KiB`;
    return `${bytes} bytes`;
  }

  showThreshold();
  showReadiness();
})();
