#!/usr/bin/env bash
# Drives the demo page of `mue serve` in headless Chromium: picks a shipped example,
# runs a captioning and an entailment request, checks that predictions and exit charts
# appear, and saves screenshots to docs/img/page_*.png.
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
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
mkdir -p docs/img
cat >"$work/check.mjs" <<JS
import { chromium } from 'playwright-core';
const browser = await chromium.launch({ executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'] });
const page = await browser.newPage({ viewport: { width: 1100, height: 1000 } });
await page.goto('http://127.0.0.1:$port/');
await page.waitForFunction(() => document.querySelectorAll('#example option').length > 1);
await page.selectOption('#example', { index: 1 });
await page.waitForFunction(() => document.querySelector('#hyp').value.length > 0);
for (const task of ['caption', 'entailment']) {
  await page.check('input[name=task][value=' + (task === 'caption' ? 'caption' : 'entail') + ']');
  await page.click('#go');
  await page.waitForFunction(() => document.querySelector('#full h3') !== null, null, { timeout: 30000 });
  const mue = await page.textContent('#mue');
  const bars = await page.locator('#mue .bar').count();
  if (!mue.includes('saved MACs') || bars < 3) throw new Error(task + ': no result on the page: ' + mue);
  await page.screenshot({ path: '$PWD/docs/img/page_' + task + '.png', fullPage: true });
  console.log(task + ': ok (' + bars + ' exit bars)');
  await page.evaluate(() => { document.querySelector('#mue').innerHTML = ''; document.querySelector('#full').innerHTML = ''; });
}
await browser.close();
JS
(cd "$work" && node check.mjs)
