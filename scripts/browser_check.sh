#!/usr/bin/env bash
# Drives the demo page of `mue serve` in headless Chromium at a desktop and a 390 px phone
# width: checks the page's known bugs stay fixed (an example replaces the hypothesis, an
# error clears old results, one image source at a time, no broken-image box, no sideways
# scrolling on a phone, a loading indicator, a favicon), runs a captioning and an
# entailment request and checks the coloured tokens, exit bars and MuE-vs-full figures, and
# saves screenshots to docs/img/page_{caption,entailment}{,_phone}.png.
# Needs Debian's chromium and npm (installs playwright-core into a temporary folder).
# Not part of CI (heavy); run by hand: bash scripts/browser_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
work=$(mktemp -d)
(cd "$work" && npm init -y >/dev/null && npm install --silent playwright-core@1 >/dev/null)
cargo build --release -q
port=18787
./target/release/mue serve --addr 127.0.0.1:$port >"$work/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
mkdir -p docs/img
cat >"$work/check.mjs" <<JS
import { chromium } from 'playwright-core';
const base = 'http://127.0.0.1:$port';
const out = '$PWD/docs/img/';
const browser = await chromium.launch({ executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'] });
function check(ok, what) { if (!ok) throw new Error('FAILED: ' + what); console.log('ok: ' + what); }
const fav = await (await fetch(base + '/favicon.ico')).text();
check(fav.startsWith('<svg'), 'favicon served');
for (const [suffix, viewport] of [['', { width: 1280, height: 900 }], ['_phone', { width: 390, height: 844 }]]) {
  const page = await browser.newPage({ viewport, deviceScaleFactor: suffix ? 2 : 1 });
  const errors = [];
  page.on('pageerror', e => errors.push(String(e)));
  page.on('response', r => { if (r.status() >= 400 && !r.url().includes('/v1/')) errors.push(r.status() + ' ' + r.url()); });
  await page.goto(base + '/');
  await page.waitForFunction(() => document.querySelectorAll('#example option').length > 2);
  check(!(await page.isVisible('#preview')), suffix + ' no image box before an image is chosen');
  check(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth),
        suffix + ' no sideways scrolling at ' + viewport.width + ' px');
  // Errors clear old results; switching examples replaces the hypothesis.
  await page.click('label:has(input[value=entail])');
  await page.click('#go');
  check((await page.textContent('#msg')).includes('Choose an example'), suffix + ' run without an image says why');
  await page.selectOption('#example', { index: 1 });
  await page.waitForFunction(() => document.querySelector('#hyp').value.length > 0);
  const hyp1 = await page.inputValue('#hyp');
  await page.selectOption('#example', { index: 2 });
  await page.waitForFunction(h => document.querySelector('#hyp').value !== h, hyp1);
  const hyp2 = await page.inputValue('#hyp');
  const want2 = await page.evaluate(() => document.querySelector('#example').selectedOptions[0].dataset.hyp);
  check(hyp2 === want2 && hyp2 !== hyp1, suffix + ' a new example replaces the hypothesis');
  check(await page.isVisible('#preview'), suffix + ' the chosen image is shown');
  await page.click('#go');
  check(await page.evaluate(() => document.querySelector('.actions').classList.contains('busy')) ||
        (await page.locator('#full h3').count()) > 0, suffix + ' loading indicator while running');
  await page.waitForFunction(() => document.querySelector('#full h3') !== null, null, { timeout: 60000 });
  check((await page.locator('#summary .figs').count()) === 1, suffix + ' entailment: MuE beside full depth figures');
  await page.screenshot({ path: out + 'page_entailment' + suffix + '.png', fullPage: true });
  await page.fill('#hyp', 'x'.repeat(3000));
  await page.click('#go');
  await page.waitForFunction(() => document.querySelector('#msg').classList.contains('err'), null, { timeout: 60000 });
  check((await page.locator('#mue h3').count()) === 0, suffix + ' an error clears the previous results');
  // Caption: tokens coloured by exit layer.
  await page.fill('#hyp', hyp2);
  await page.click('label:has(input[value=caption])');
  await page.click('#go');
  await page.waitForFunction(() => document.querySelector('#full h3') !== null, null, { timeout: 60000 });
  const toks = await page.locator('#mue .tok').count();
  check(toks >= 2, suffix + ' caption: ' + toks + ' tokens coloured by exit layer');
  check(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth),
        suffix + ' no sideways scrolling with results');
  await page.screenshot({ path: out + 'page_caption' + suffix + '.png', fullPage: true });
  // One source at a time: an upload clears the example menu.
  await page.setInputFiles('#file', '$PWD/examples/example_0.png');
  await page.waitForFunction(() => document.querySelector('#chosen').textContent.startsWith('Uploaded'));
  check(await page.inputValue('#example') === '', suffix + ' an upload clears the example menu');
  check(errors.length === 0, suffix + ' no page errors or failed loads: ' + errors.join('; '));
  await page.close();
}
await browser.close();
JS
(cd "$work" && node check.mjs)
