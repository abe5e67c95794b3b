// Shared helpers of Cake's k6 scenarios (no remote jslib: the box has no internet).
import http from 'k6/http';

export const BASE = __ENV.GATEWAY || 'http://127.0.0.1:8080';
export const JSON_HEADERS = { 'content-type': 'application/json' };
export const TREND_STATS = ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)', 'count'];

export function post(path, body, token, extraHeaders, name) {
  const headers = Object.assign({}, JSON_HEADERS, extraHeaders || {});
  if (token) headers.authorization = `Bearer ${token}`;
  return http.post(`${BASE}${path}`, JSON.stringify(body || {}), { headers, tags: { name: name || path } });
}

export function get(path, token, name) {
  const headers = token ? { authorization: `Bearer ${token}` } : {};
  return http.get(`${BASE}${path}`, { headers, tags: { name: name || path } });
}

export function uniqueSuffix() {
  return `${Date.now().toString(36)}${__VU.toString(36)}${__ITER.toString(36)}${Math.floor(Math.random() * 1e6).toString(36)}`;
}

function fmt(values, key) {
  const v = values[key];
  return v === undefined ? '-' : v.toFixed(1);
}

// Writes the full summary JSON to SUMMARY_FILE and prints one line per custom trend.
export function summaryWriter(data, trends) {
  const lines = [];
  for (const name of trends) {
    const m = data.metrics[name];
    if (!m) continue;
    const v = m.values;
    lines.push(`${name.padEnd(24)} n=${v.count} p50=${fmt(v, 'med')} p95=${fmt(v, 'p(95)')} p99=${fmt(v, 'p(99)')} ms`);
  }
  const out = { stdout: `${lines.join('\n')}\n` };
  if (__ENV.SUMMARY_FILE) out[__ENV.SUMMARY_FILE] = JSON.stringify(data, null, 1);
  return out;
}
