// CMV CDS card preview (GET /preview): loads an example or a pasted CDS Hooks request, POSTs it to this
// service's own hook endpoint and renders the cards as an EHR shows them.
//
// Everything the service answers is untrusted: it is put on the page with DOM text nodes only (never
// innerHTML), card markdown goes through the small renderer below (paragraphs, **bold**, lists, line
// breaks; everything else stays literal text), and only absolute http(s) URLs become links. The page's
// Content-Security-Policy (service/preview.py) allows no inline script and only same-origin requests.
"use strict";

(function () {
  const INDICATORS = { info: "Info", warning: "Warning", critical: "Critical" };

  // ---- DOM helpers ------------------------------------------------------------------------------

  /** An element with attributes ("class", "text" for textContent, others as attributes) and children. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child); // strings become text nodes
    }
    return node;
  }

  /** An absolute http(s) URL, or null: relative, javascript:, data: and other schemes never become links. */
  function safeHttpUrl(value) {
    if (typeof value !== "string") return null;
    try {
      const url = new URL(value);
      return url.protocol === "https:" || url.protocol === "http:" ? url.href : null;
    } catch {
      return null;
    }
  }

  function text(value) {
    return typeof value === "string" ? value : value === undefined || value === null ? "" : String(value);
  }

  // ---- markdown (the subset CDS Hooks cards here use) ----------------------------------------------

  const BOLD = /\*\*(?=\S)([\s\S]*?\S)\*\*/g;
  const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
  const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;

  /** Text with **bold** spans, appended to ``parent`` as text nodes and <strong> elements. */
  function appendInline(parent, line) {
    let last = 0;
    BOLD.lastIndex = 0;
    for (let match = BOLD.exec(line); match !== null; match = BOLD.exec(line)) {
      if (match.index > last) parent.append(line.slice(last, match.index));
      parent.append(el("strong", { text: match[1] }));
      last = BOLD.lastIndex;
    }
    if (last < line.length) parent.append(line.slice(last));
  }

  /**
   * Markdown → a DocumentFragment: blank lines separate paragraphs, a single newline is a line break,
   * "- " / "* " / "1. " lines are list items (an indented line continues the item), **x** is bold.
   * Anything else, HTML included, is shown as the literal text it is.
   */
  function renderMarkdown(source) {
    const fragment = document.createDocumentFragment();
    const lines = text(source).replace(/\r\n?/g, "\n").split("\n");
    let paragraph = [];
    let list = null;
    let item = null;
    const flushParagraph = () => {
      if (paragraph.length === 0) return;
      const p = el("p");
      paragraph.forEach((line, index) => {
        if (index > 0) p.append(el("br"));
        appendInline(p, line);
      });
      fragment.append(p);
      paragraph = [];
    };
    const closeList = () => {
      list = null;
      item = null;
    };
    for (const raw of lines) {
      const line = raw.replace(/\s+$/, "");
      if (line.trim() === "") {
        flushParagraph();
        closeList();
        continue;
      }
      const bullet = BULLET.exec(line);
      const numbered = bullet ? null : NUMBERED.exec(line);
      if (bullet || numbered) {
        flushParagraph();
        const tag = bullet ? "ul" : "ol";
        if (!list || list.tagName.toLowerCase() !== tag) {
          list = el(tag);
          if (numbered && Number(numbered[1]) !== 1) list.setAttribute("start", String(Number(numbered[1])));
          fragment.append(list);
        }
        item = el("li");
        appendInline(item, bullet ? bullet[1] : numbered[2]);
        list.append(item);
        continue;
      }
      if (item && /^\s{2,}\S/.test(line)) {
        item.append(el("br"));
        appendInline(item, line.trim());
        continue;
      }
      closeList();
      paragraph.push(line.trim());
    }
    flushParagraph();
    return fragment;
  }

  // ---- cards ----------------------------------------------------------------------------------------

  /** "ganciclovir 400 mg IV every 12 hours" for a MedicationRequest, or null. */
  function medicationSummary(resource) {
    if (!resource || resource.resourceType !== "MedicationRequest") return null;
    const dosage = Array.isArray(resource.dosageInstruction) ? resource.dosageInstruction[0] : null;
    if (dosage && typeof dosage.text === "string" && dosage.text.trim()) return dosage.text.split(";")[0].trim();
    const concept = resource.medicationCodeableConcept || {};
    const coding = Array.isArray(concept.coding) ? concept.coding[0] || {} : {};
    const name = text(concept.text || coding.display).trim();
    const dose = dosage && Array.isArray(dosage.doseAndRate) ? (dosage.doseAndRate[0] || {}).doseQuantity : null;
    const amount = dose && dose.value !== undefined ? `${dose.value} ${text(dose.unit || dose.code)}`.trim() : "";
    return [name, amount].filter(Boolean).join(" ") || null;
  }

  function renderActions(suggestion) {
    const actions = Array.isArray(suggestion.actions) ? suggestion.actions : [];
    const panel = el("div", { class: "suggestion-actions" });
    panel.append(el("div", { text: `Accepting "${text(suggestion.label)}" would send the EHR:` }));
    const list = el("ul");
    for (const action of actions) {
      const resource = action && action.resource;
      const target = resource ? `${text(resource.resourceType)}${resource.id ? "/" + text(resource.id) : ""}` : "";
      const entry = el("li", {}, el("strong", { text: text(action && action.type) }), ` ${target}: ${text(action && action.description)}`);
      if (resource) {
        entry.append(el("details", {}, el("summary", { text: "resource" }), el("pre", { text: JSON.stringify(resource, null, 2) })));
      }
      list.append(entry);
    }
    if (actions.length === 0) list.append(el("li", { text: "no actions" }));
    panel.append(list);
    return panel;
  }

  function renderSuggestions(card) {
    const suggestions = Array.isArray(card.suggestions) ? card.suggestions : [];
    if (suggestions.length === 0) return null;
    const wrapper = el("div", { class: "suggestions-block" });
    const bar = el("div", { class: "suggestions", role: "group", "aria-label": "Suggestions" });
    const slot = el("div");
    suggestions.forEach((suggestion, index) => {
      const label = text(suggestion.label) || "Suggestion";
      const button = el("button", {
        type: "button",
        class: "suggestion" + (suggestion.isRecommended ? " recommended" : ""),
        "aria-pressed": "false",
        "data-suggestion-index": index,
        title: suggestion.isRecommended ? "Recommended" : null,
        text: label,
      });
      // A label that does not itself name the proposed drug and dose gets them from its actions.
      const doses = (Array.isArray(suggestion.actions) ? suggestion.actions : [])
        .filter((action) => action && (action.type === "create" || action.type === "update"))
        .map((action) => medicationSummary(action.resource))
        .filter((summary) => summary && !label.includes(summary));
      if (doses.length) button.append(el("br"), el("small", { class: "dose", text: doses.join(" + ") }));
      button.addEventListener("click", () => {
        const pressed = button.getAttribute("aria-pressed") === "true";
        for (const other of bar.querySelectorAll("button")) other.setAttribute("aria-pressed", "false");
        slot.replaceChildren();
        if (!pressed) {
          button.setAttribute("aria-pressed", "true");
          slot.append(renderActions(suggestion));
        }
      });
      bar.append(button);
    });
    wrapper.append(bar, slot);
    return wrapper;
  }

  function renderLinks(card) {
    const links = Array.isArray(card.links) ? card.links : [];
    if (links.length === 0) return null;
    const block = el("div", { class: "card-links" });
    for (const link of links) {
      const href = link && link.type !== "smart" ? safeHttpUrl(link.url) : null;
      const label = text(link && link.label) || text(link && link.url);
      block.append(
        href
          ? el("a", { href, target: "_blank", rel: "noopener noreferrer", text: label })
          : el("span", { text: `${label} (${text(link && link.type) || "link"}, not opened here)` }),
      );
    }
    return block;
  }

  function renderSource(card) {
    const source = card.source || {};
    const label = text(source.label) || "source";
    const href = safeHttpUrl(source.url);
    const link = href ? el("a", { class: "source-link", href, target: "_blank", rel: "noopener noreferrer", text: label }) : el("span", { text: label });
    return el("div", { class: "card-source" }, "Source: ", link);
  }

  function renderOverrideReasons(card) {
    const reasons = Array.isArray(card.overrideReasons) ? card.overrideReasons : [];
    if (reasons.length === 0) return null;
    const list = el("ul");
    for (const reason of reasons) list.append(el("li", { text: text(reason && (reason.display || reason.code)) }));
    return el("details", { class: "override" }, el("summary", { text: `Override reasons offered (${reasons.length})` }), list);
  }

  /** One card as an EHR shows it: indicator, summary, detail, suggestions, links, source. */
  function renderCard(card, index) {
    const indicator = Object.hasOwn(INDICATORS, card.indicator) ? card.indicator : "info";
    const root = el("article", { class: `card indicator-${indicator}`, "data-indicator": indicator, "data-card-index": index });
    root.append(
      el("div", { class: "card-head" }, el("span", { class: "badge", text: INDICATORS[indicator] }), el("h3", { class: "card-summary", text: text(card.summary) })),
    );
    if (card.detail) {
      const detail = el("div", { class: "card-detail" });
      detail.append(renderMarkdown(card.detail));
      root.append(detail);
    }
    for (const part of [renderSuggestions(card), renderLinks(card), renderSource(card), renderOverrideReasons(card)]) {
      if (part) root.append(part);
    }
    return root;
  }

  // ---- errors -------------------------------------------------------------------------------------

  function renderOutcome(status, statusText, outcome) {
    const box = el("div", { class: "outcome", role: "alert" });
    const reason = text(statusText).toLowerCase().replace(/\b[a-z]/g, (letter) => letter.toUpperCase());
    box.append(el("h3", { text: `The service answered ${status}${reason ? " " + reason : ""}` }));
    const list = el("ul");
    for (const issue of Array.isArray(outcome.issue) ? outcome.issue : []) {
      const entry = el("li", { class: "issue" });
      entry.append(el("strong", { text: `${text(issue.severity) || "error"} (${text(issue.code) || "unknown"})` }), ": ", text(issue.diagnostics) || "no details");
      const where = Array.isArray(issue.expression) ? issue.expression.map(text).join(", ") : "";
      if (where) entry.append(" at ", el("code", { text: where }));
      list.append(entry);
    }
    box.append(list);
    if (status === 401) box.append(el("p", { text: "This service requires a CDS Hooks client JWT for the hook call: paste one in the Bearer token field." }));
    return box;
  }

  function renderFailure(title, detail) {
    return el("div", { class: "outcome", role: "alert" }, el("h3", { text: title }), detail ? el("pre", { text: detail.slice(0, 4000) }) : null);
  }

  // ---- the page -------------------------------------------------------------------------------------

  function start() {
    const form = document.getElementById("run-form");
    const exampleSelect = document.getElementById("example");
    const serviceSelect = document.getElementById("service");
    const tokenRow = document.getElementById("token-row");
    const tokenInput = document.getElementById("token");
    const requestBox = document.getElementById("request");
    const runButton = document.getElementById("run");
    const status = document.getElementById("status");
    const summaryLine = document.getElementById("summary-line");
    const results = document.getElementById("results");
    let services = [];

    const url = (relative) => new URL(relative, document.baseURI);

    function selectServiceFor(requestText) {
      let hook = null;
      try {
        const parsed = JSON.parse(requestText);
        hook = parsed && typeof parsed.hook === "string" ? parsed.hook : null;
      } catch {
        return;
      }
      const match = services.find((service) => service.hook === hook);
      if (match) serviceSelect.value = match.id;
    }

    async function loadIndex() {
      try {
        const response = await fetch(url("preview/examples"), { credentials: "omit", cache: "no-store" });
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        const index = await response.json();
        services = Array.isArray(index.services) ? index.services : [];
        for (const service of services) {
          serviceSelect.append(el("option", { value: service.id, text: `${text(service.id)} (${text(service.hook)})` }));
        }
        for (const example of Array.isArray(index.examples) ? index.examples : []) {
          exampleSelect.append(el("option", { value: example.name, text: example.hook ? `${text(example.name)} (${text(example.hook)})` : text(example.name) }));
        }
        tokenRow.hidden = !index.authRequired;
        document.body.dataset.ready = "true";
      } catch (error) {
        status.textContent = `Could not load the examples: ${error}`;
        document.body.dataset.ready = "error";
      }
    }

    async function loadExample(name) {
      if (!name) return;
      status.textContent = `Loading ${name}…`;
      try {
        const response = await fetch(url("preview/examples/" + encodeURIComponent(name)), { credentials: "omit", cache: "no-store" });
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        const body = await response.text();
        let pretty = body;
        try {
          pretty = JSON.stringify(JSON.parse(body), null, 2);
        } catch {
          /* shown as stored */
        }
        requestBox.value = pretty;
        requestBox.dataset.loaded = name;
        selectServiceFor(pretty);
        status.textContent = `Loaded ${name}`;
      } catch (error) {
        status.textContent = `Could not load ${name}: ${error}`;
      }
    }

    async function run(event) {
      event.preventDefault();
      const serviceId = serviceSelect.value;
      if (!serviceId) return;
      const headers = { "Content-Type": "application/json", Accept: "application/json" };
      const token = tokenInput.value.trim().replace(/^Bearer\s+/i, "");
      if (token) headers.Authorization = `Bearer ${token}`;
      runButton.disabled = true;
      results.dataset.state = "running";
      status.textContent = "Running…";
      const started = performance.now();
      results.replaceChildren();
      try {
        // Invalid JSON is sent as it is: the service's own 400 says what is wrong.
        const response = await fetch(url("cds-services/" + encodeURIComponent(serviceId)), {
          method: "POST",
          headers,
          body: requestBox.value,
          credentials: "omit",
          cache: "no-store",
          redirect: "error",
        });
        const elapsed = Math.round(performance.now() - started);
        const bodyText = await response.text();
        let body = null;
        try {
          body = JSON.parse(bodyText);
        } catch {
          body = null;
        }
        const requestId = response.headers.get("X-Request-ID");
        const meta = `HTTP ${response.status} · ${elapsed} ms${requestId ? " · request id " + requestId : ""}`;
        if (response.ok && body && Array.isArray(body.cards)) {
          const count = body.cards.length;
          summaryLine.textContent = `${count} card${count === 1 ? "" : "s"} from ${serviceId} · ${meta}`;
          if (count === 0) results.append(el("div", { class: "empty", text: "No cards: the service has nothing to say about this request." }));
          body.cards.forEach((card, index) => results.append(renderCard(card || {}, index)));
          results.dataset.state = "done";
        } else if (body && body.resourceType === "OperationOutcome") {
          summaryLine.textContent = meta;
          results.append(renderOutcome(response.status, response.statusText, body));
          results.dataset.state = "error";
        } else {
          summaryLine.textContent = meta;
          results.append(renderFailure(`Unexpected answer: HTTP ${response.status}`, bodyText));
          results.dataset.state = "error";
        }
        status.textContent = "";
      } catch (error) {
        summaryLine.textContent = "";
        results.append(renderFailure("The service could not be reached", String(error)));
        results.dataset.state = "error";
        status.textContent = "";
      } finally {
        runButton.disabled = false;
      }
    }

    exampleSelect.addEventListener("change", () => loadExample(exampleSelect.value));
    requestBox.addEventListener("change", () => {
      delete requestBox.dataset.loaded;
      selectServiceFor(requestBox.value);
    });
    form.addEventListener("submit", run);
    loadIndex();
  }

  // For tests and for integrators' own tooling: the renderers, with no access to the page's state.
  window.cmvPreview = Object.freeze({ renderMarkdown, renderCard });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
