// End to end in a real browser: `finprint serve` on a small synthetic catalogue (zero-shot
// EfficientNet-Lite0 features, no training), a researcher uploads a test photo in headless
// Debian Chromium, sees the right individual among the candidates (ranked with local features),
// looks at the lines between the marks its photo shares with the upload, confirms it with one
// click, and finds the new sighting on the individual's page. Screenshots go to target/browser/.
//
// Run from the repository root after `cargo build --release`: `node tests/browser/identify.test.mjs`.
import { chromium } from "playwright-core";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, mkdirSync, readFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const bin = process.env.FINPRINT_BIN || path.join(root, "target/release/finprint");
const browserPath = process.env.CHROMIUM || "/usr/bin/chromium";
const shots = path.join(root, "target/browser");
const TOKEN = "browser-test-token";
// The synthetic catalogue is the same bytes for the same flags and seed, and the zero-shot
// model is deterministic, so the photo below is fixed: the first known test photo (by name) of
// test_solution.csv for --seed 1 whose true individual zero-shot Lite0 at 128 px ranks first.
const SYNTH = ["--individuals", "48", "--width", "192", "--height", "128", "--max-photos", "10", "--seed", "1"];
const PHOTO = "0d195cbb9c182c.jpg";

const work = mkdtempSync(path.join(tmpdir(), "finprint-browser-"));
let server;
let context;

function fail(message) {
  throw new Error(message);
}

async function startServer() {
  server = spawn(bin, [
    "serve", "--catalog", path.join(work, "catalog"), "--import", path.join(work, "synth"),
    "--zero-shot", "efficientnet_lite0", "--img-size", "128", "--addr", "127.0.0.1:0",
    "--token", TOKEN, "--threads", "2", "--local", "rootsift",
  ], { stdio: ["ignore", "pipe", "pipe"] });
  let log = "";
  server.stderr.on("data", (d) => (log += d));
  return await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("finprint serve did not start in 90 s:\n" + log)), 90_000);
    server.stdout.on("data", (d) => {
      log += d;
      const m = log.match(/serving on (http:\/\/\S+?)\/#token=/);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    server.on("exit", (code) => reject(new Error(`finprint serve exited (${code}):\n${log}`)));
  });
}

async function main() {
  if (!existsSync(bin)) fail(`${bin} is missing: run cargo build --release first`);
  if (!existsSync(browserPath)) fail(`${browserPath} is missing: apt-get install chromium`);
  mkdirSync(shots, { recursive: true });
  execFileSync(bin, ["synth", "--out", path.join(work, "synth"), ...SYNTH], { stdio: "ignore" });
  const solution = readFileSync(path.join(work, "synth/test_solution.csv"), "utf8").trim().split("\n").slice(1)
    .map((line) => line.split(","));
  const row = solution.find(([image]) => image === PHOTO) || fail(`${PHOTO} is not in test_solution.csv`);
  const truth = row[1];
  const base = await startServer();

  context = await chromium.launchPersistentContext(path.join(work, "profile"), {
    executablePath: browserPath,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
    viewport: { width: 1400, height: 900 },
  });
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(30_000);
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));

  // The link the service prints carries the token; the page keeps it.
  await page.goto(`${base}/#token=${TOKEN}`);
  await page.fill("#by", "Test Researcher");
  await page.dispatchEvent("#by", "change");
  await page.fill("#place", "Hauraki Gulf");
  await page.fill("#date", "2026-11-28");
  await page.fill("#photographer", "A. Photographer");
  await page.setInputFiles("#files", path.join(work, "synth/test_images", PHOTO));

  const card = page.locator("article.result").first();
  await card.waitFor();
  const image = await card.getAttribute("data-image");
  const candidates = await card.locator("li.candidate").evaluateAll((els) => els.map((e) => e.dataset.individual));
  console.log(`candidates for ${PHOTO} (truth ${truth}): ${candidates.join(", ")}`);
  if (candidates.length !== 5) fail(`expected 5 candidates, got ${candidates.length}`);
  if (!candidates.includes(truth)) fail(`the true individual ${truth} is not among the candidates`);
  await page.waitForFunction(() => [...document.images].every((i) => i.complete && i.naturalWidth > 0));
  await page.screenshot({ path: path.join(shots, "identify.png"), fullPage: true });

  // The marks the truth's best photo shares with the upload, as lines between the two photos.
  const show = card.locator(`li.candidate[data-individual="${truth}"] button.show-matches`);
  await show.click();
  if ((await show.getAttribute("aria-expanded")) !== "true") fail("Show matches did not open the match view");
  const count = card.locator('[data-testid="match-count"]');
  await count.waitFor();
  const countText = await count.textContent();
  const marks = Number((countText.match(/^(\d+) matching marks?/) || [])[1]);
  if (!(marks > 0)) fail(`the match view shows no count of matching marks: "${countText}"`);
  // Drawn once both photos are laid out: each line spans from one photo to the other.
  await page.waitForFunction(() => {
    const photos = [...document.querySelectorAll(".match-view img")];
    const line = document.querySelector(".match-view svg.lines line");
    return photos.length === 2 && photos.every((i) => i.complete && i.naturalWidth > 0) && line && line.getTotalLength() > 1;
  });
  const lines = await card.locator(".match-view svg.lines line").count();
  console.log(`match view: "${countText}", ${lines} lines drawn`);
  if (lines !== marks) fail(`${lines} lines drawn for ${marks} matching marks`);
  await page.waitForFunction(() => [...document.images].every((i) => i.complete && i.naturalWidth > 0));
  await page.screenshot({ path: path.join(shots, "matches.png"), fullPage: true });

  await card.locator(`li.candidate[data-individual="${truth}"] button.confirm`).click();
  const link = card.locator('[data-testid="decided-link"]');
  await link.waitFor();
  if ((await link.textContent()) !== truth) fail("the recorded decision names another individual");

  await link.click();
  await page.locator('[data-testid="individual-id"]').waitFor();
  if ((await page.textContent('[data-testid="individual-id"]')) !== truth) fail("wrong individual page");
  const sighting = page.locator(`figure.sighting-card[data-image="${image}"]`);
  await sighting.waitFor();
  const caption = await sighting.textContent();
  for (const want of ["Hauraki Gulf", "2026-11-28", "by A. Photographer"]) {
    if (!caption.includes(want)) fail(`the sighting lacks "${want}": ${caption}`);
  }
  const history = await page.textContent("table.history");
  if (!history.includes("confirm") || !history.includes("Test Researcher")) fail("the decision is not in the history");
  await page.waitForFunction(() => [...document.images].every((i) => i.complete));
  await page.screenshot({ path: path.join(shots, "individual.png"), fullPage: true });
  if (errors.length) fail("errors in the page: " + errors.join("; "));
}

let failed = 0;
try {
  await main();
  console.log("browser test: confirmed in the page, sighting found on the individual's page");
} catch (e) {
  failed = 1;
  console.error("browser test failed:", e.message);
} finally {
  if (context) await context.close().catch(() => {});
  if (server && server.exitCode === null) {
    server.kill("SIGINT");
    await new Promise((r) => setTimeout(r, 300));
    if (server.exitCode === null) server.kill("SIGKILL");
  }
  rmSync(work, { recursive: true, force: true });
}
console.log(`browser: ${1 - failed} passed, ${failed} failed`);
process.exit(failed);
