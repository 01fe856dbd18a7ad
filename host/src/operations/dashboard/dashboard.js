// The dashboard: polls the admin API every second and draws what it says. Rates,
// error shares and p99 come from the difference between two readings of /api/stats.
'use strict';

const POLL_MS = 1000;
const TOKEN_KEY = 'host-admin-token';
let previous = null; // the last /api/stats reading
let rates = {};      // server name -> {rps, errorRate, p99}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

// A call to the admin API with the bearer token. A 401 shows the token form (once: it
// stays until a token is given) and stops polling until then. Only a 401 for the token
// the page still holds counts: a call sent before a token was given may come back after
// it was, and must not throw the new one away.
async function api(path, options = {}) {
  const headers = {};
  const sent = token();
  if (sent) headers['Authorization'] = 'Bearer ' + sent;
  const response = await fetch(path, { ...options, headers, cache: 'no-store' });
  if (response.status === 401 && token() === sent) {
    sessionStorage.removeItem(TOKEN_KEY);
    document.getElementById('login').hidden = false;
  }
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  return { ok: response.ok, status: response.status, body };
}

function needsToken() { return !document.getElementById('login').hidden; }

function escape(text) {
  return String(text ?? '').replace(/[&<>"']/g, c => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
}

// The latency below which a share q of the responses fell, from bucket counts (linear
// within a bucket, as Prometheus' histogram_quantile).
function quantile(buckets, bounds, q) {
  const total = buckets.reduce((a, b) => a + b, 0);
  if (total === 0) return null;
  const rank = q * total;
  let below = 0;
  for (let i = 0; i < buckets.length; i++) {
    const n = buckets[i];
    if (n > 0 && below + n >= rank) {
      if (i >= bounds.length) return bounds[bounds.length - 1];
      const lower = i === 0 ? 0 : bounds[i - 1];
      return lower + (bounds[i] - lower) * ((rank - below) / n);
    }
    below += n;
  }
  return bounds[bounds.length - 1];
}

function updateRates(stats) {
  if (previous) {
    const seconds = (stats.uptime_ms - previous.uptime_ms) / 1000;
    const before = Object.fromEntries(previous.servers.map(s => [s.name, s]));
    for (const s of stats.servers) {
      const p = before[s.name];
      if (!p || seconds <= 0) continue;
      const requests = s.requests - p.requests;
      const errors = s.errors - p.errors;
      const buckets = s.buckets.map((n, i) => n - (p.buckets[i] || 0));
      rates[s.name] = {
        rps: requests / seconds,
        errorRate: requests > 0 ? errors / requests : null,
        p99: quantile(buckets, stats.latency_bounds_s, 0.99),
      };
    }
  }
  previous = stats;
}

function ms(seconds) {
  if (seconds == null) return '–';
  return seconds < 0.001 ? (seconds * 1e6).toFixed(0) + ' µs' : (seconds * 1000).toFixed(1) + ' ms';
}

function serverRow(s, recording) {
  const r = rates[s.name] || {};
  const plugin = s.plugin || {};
  const last = s.last_reload;
  const lastText = last ? `<span class="${last.result}">${escape(last.result)}</span>` +
    (last.error ? `<span class="reason">${escape(last.error)}</span>` : '') : '–';
  const on = s.enabled;
  const action = (name, enabled) =>
    `<button data-action="${name}" data-server="${escape(s.name)}"${enabled ? '' : ' disabled'}>${name}</button>`;
  return `<tr data-server="${escape(s.name)}">
    <td><strong>${escape(s.name)}</strong></td>
    <td><span class="state ${escape(s.state)}">${escape(s.state)}</span>${
      s.reason && s.state !== 'drained' ? `<span class="reason">${escape(s.reason)}</span>` : ''}</td>
    <td class="generation">${s.generation ?? '–'}</td>
    <td>${plugin.name ? escape(plugin.name + ' ' + plugin.version) : '–'}</td>
    <td><code>${escape(plugin.build || '–')}</code></td>
    <td class="num rps">${recording && r.rps != null ? r.rps.toFixed(1) : '–'}</td>
    <td class="num">${recording && r.errorRate != null ? (r.errorRate * 100).toFixed(1) + ' %' : '–'}</td>
    <td class="num">${recording ? ms(r.p99) : '–'}</td>
    <td class="num">${s.in_flight ?? 0}</td>
    <td>${lastText}</td>
    <td>${action('reload', on && !s.drained && s.plugin)}${action('enable', !on || s.drained)}${
      action('disable', on && !s.drop_in)}${action('drain', on && !s.drained)}</td>
  </tr>`;
}

function reloadRow(r) {
  return `<tr><td>${escape(r.at)}</td><td>${escape(r.server)}</td><td>${escape(r.cause)}</td>
    <td class="${r.result}">${escape(r.result)}</td><td>${r.generation ?? '–'}</td>
    <td class="num">${r.took_ms.toFixed(1)} ms</td><td>${escape(r.error || '')}</td></tr>`;
}

async function poll() {
  const status = document.getElementById('status');
  if (needsToken()) {
    status.className = 'error';
    status.textContent = 'waiting for the admin token';
    return;
  }
  try {
    const [servers, stats, reloads] = await Promise.all(
      [api('/api/servers'), api('/api/stats'), api('/api/reloads')]);
    if (!servers.ok || !stats.ok || !reloads.ok) {
      const failed = [servers, stats, reloads].find(r => !r.ok);
      throw new Error((failed.body && failed.body.error) || 'HTTP ' + failed.status);
    }
    updateRates(stats.body);
    const recording = stats.body.recording;
    document.querySelector('#servers tbody').innerHTML =
      servers.body.servers.map(s => serverRow(s, recording)).join('');
    document.querySelector('#reloads tbody').innerHTML =
      reloads.body.reloads.map(reloadRow).join('');
    status.className = '';
    status.textContent = 'updated ' + new Date().toLocaleTimeString() +
      (recording ? '' : ' · metrics are off (global.metrics): no traffic figures');
  } catch (e) {
    status.className = 'error';
    status.textContent = 'cannot reach the admin API: ' + e.message;
  }
}

document.addEventListener('click', async event => {
  const button = event.target.closest('button[data-action]');
  if (!button) return;
  const { action, server } = button.dataset;
  button.disabled = true;
  const message = document.getElementById('message');
  const result = await api(`/api/servers/${encodeURIComponent(server)}/${action}`, { method: 'POST' });
  message.className = result.ok ? '' : 'error';
  message.textContent = `${action} ${server}: ` +
    (result.ok ? result.body.message : (result.body && result.body.error) || 'HTTP ' + result.status);
  poll();
});

document.getElementById('login').addEventListener('submit', event => {
  event.preventDefault();
  const field = document.getElementById('token');
  sessionStorage.setItem(TOKEN_KEY, field.value.trim());
  field.value = '';
  document.getElementById('login').hidden = true;
  poll();
});

poll();
setInterval(poll, POLL_MS);
