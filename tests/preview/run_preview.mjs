// Drives the card preview page (GET /preview) in Debian's headless Chromium with playwright-core.
//
//   node tests/preview/run_preview.mjs <preview URL> <screenshot.png>
//
// Opens the page, picks order-select-ganciclovir.json, presses Run, waits for the cards, takes a
// screenshot, then checks the suggestion button, the markdown renderer on hostile input and a refused
// request. Prints one JSON object to stdout (what tests/test_preview.py asserts on); exits 1 on an error
// (with the message on stderr). Never downloads a browser: it uses /usr/bin/chromium
// (CHROMIUM_PATH overrides).
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { chromium } from "playwright-core";

const [url, screenshotPath] = process.argv.slice(2);
if (!url || !screenshotPath) {
  console.error("usage: node run_preview.mjs <preview URL> <screenshot.png>");
  process.exit(2);
}

const EXAMPLE = process.env.PREVIEW_EXAMPLE || "order-select-ganciclovir.json";
const TIMEOUT_MS = 20_000;
// As the machine notes prescribe for Debian's Chromium as root on a closed network.
const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const userDataDir = await mkdtemp(join(tmpdir(), "cmv-preview-chromium-"));
let context;
try {
  // A persistent context on a fresh, empty user-data-dir (removed at the end).
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
    headless: true,
    args: FLAGS,
    viewport: { width: 1360, height: 900 },
    timeout: TIMEOUT_MS,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(TIMEOUT_MS);

  // Anything the page logs as an error (a CSP violation included) or throws is reported.
  const consoleErrors = [];
  page.on("console", (message) => {
    if (message.type() === "error") consoleErrors.push(message.text());
  });
  page.on("pageerror", (error) => consoleErrors.push(`pageerror: ${error.message}`));
  const requests = [];
  page.on("request", (request) => requests.push(`${request.method()} ${new URL(request.url()).pathname}`));

  const response = await page.goto(url, { waitUntil: "load" });
  const pageHeaders = response ? response.headers() : {};
  await page.waitForSelector(`#example option[value="${EXAMPLE}"]`, { state: "attached" });
  const tokenFieldVisible = await page.isVisible("#token");

  await page.selectOption("#example", EXAMPLE);
  await page.waitForFunction((name) => document.querySelector("#request").dataset.loaded === name, EXAMPLE);
  const selectedService = await page.inputValue("#service");

  await page.click("#run");
  await page.waitForSelector('#results[data-state="done"], #results[data-state="error"]');
  const state = await page.getAttribute("#results", "data-state");
  if (state !== "done") {
    throw new Error(`the hook call failed: ${await page.textContent("#results")}`);
  }
  await page.waitForSelector("#results .card");

  const cards = await page.$$eval("#results .card", (nodes) =>
    nodes.map((card) => {
      const detail = card.querySelector(".card-detail");
      const source = card.querySelector(".card-source a");
      return {
        indicator: card.dataset.indicator,
        badge: card.querySelector(".badge")?.textContent ?? "",
        borderLeftColor: getComputedStyle(card).borderLeftColor,
        summary: card.querySelector(".card-summary")?.textContent ?? "",
        detailText: detail ? detail.innerText : "",
        detailHtml: detail ? detail.innerHTML : "",
        strong: detail ? [...detail.querySelectorAll("strong")].map((node) => node.textContent) : [],
        paragraphs: detail ? detail.querySelectorAll("p").length : 0,
        listItems: detail ? [...detail.querySelectorAll("li")].map((node) => node.textContent) : [],
        suggestions: [...card.querySelectorAll("button.suggestion")].map((node) => node.innerText),
        sourceText: source ? source.textContent : "",
        sourceHref: source ? source.getAttribute("href") : null,
        sourceRel: source ? source.getAttribute("rel") : null,
        text: card.innerText,
      };
    }),
  );
  const summaryLine = await page.textContent("#summary-line");
  await page.screenshot({ path: screenshotPath, fullPage: true });

  // The first suggestion of the first card, pressed: the actions it would send appear.
  await page.click("#results .card button.suggestion >> nth=0");
  const actionsText = await page.textContent("#results .card .suggestion-actions");

  // The renderer on hostile markdown: nothing but text, <p>, <br>, <strong>, lists.
  const hostile = await page.evaluate(() => {
    const host = document.createElement("div");
    host.append(
      window.cmvPreview.renderMarkdown(
        '<img src=x onerror="window.__pwned=1"> **bold <b>x</b>**\n<script>window.__pwned=2</script>\n\n- [a](javascript:alert(1))\n- *not italic*',
      ),
    );
    const card = window.cmvPreview.renderCard(
      { summary: "<i>s</i>", indicator: "bogus", source: { label: "evil", url: "javascript:alert(1)" }, links: [{ label: "l", url: "data:text/html,x", type: "absolute" }] },
      0,
    );
    return {
      html: host.innerHTML,
      tags: [...new Set([...host.querySelectorAll("*")].map((node) => node.tagName.toLowerCase()))].sort(),
      pwned: window.__pwned ?? null,
      cardAnchors: card.querySelectorAll("a").length,
      cardIndicator: card.dataset.indicator,
      cardSummaryHtml: card.querySelector(".card-summary").innerHTML,
    };
  });

  // A refused request: the OperationOutcome is shown readably (Chromium logs the 400 as a console error).
  const consoleErrorsBeforeRefusal = [...consoleErrors];
  await page.fill("#request", JSON.stringify({ hook: "order-select", hookInstance: "preview-test" }));
  await page.click("#run");
  await page.waitForSelector('#results[data-state="error"] .outcome');
  const errorText = await page.innerText("#results .outcome");
  const errorSummary = await page.textContent("#summary-line");
  await page.screenshot({ path: screenshotPath.replace(/\.png$/, "") + "-error.png", fullPage: true });

  const result = {
    title: await page.title(),
    pageHeaders: { "content-security-policy": pageHeaders["content-security-policy"] ?? null },
    tokenFieldVisible,
    selectedService,
    summaryLine,
    cards,
    actionsText,
    hostile,
    errorText,
    errorSummary,
    requests,
    consoleErrorsBeforeRefusal,
    consoleErrors,
  };
  process.stdout.write(JSON.stringify(result) + "\n");
} catch (error) {
  console.error(error && error.stack ? error.stack : String(error));
  process.exitCode = 1;
} finally {
  if (context) await context.close().catch(() => {});
  await rm(userDataDir, { recursive: true, force: true }).catch(() => {});
}
