// Closed-model GET load on one URL (ceilings: Envoy direct_response). Env: URL, VUS, DURATION.
import http from 'k6/http';
import { Rate, Trend } from 'k6/metrics';
import { summaryWriter, TREND_STATS } from './lib.js';

const latency = new Trend('op_get_ms', true);
const failed = new Rate('op_get_failed');

export const options = {
  summaryTrendStats: TREND_STATS,
  scenarios: { load: { executor: 'constant-vus', vus: Number(__ENV.VUS || 16), duration: __ENV.DURATION || '5s' } },
};

export default function () {
  const res = http.get(__ENV.URL);
  latency.add(res.timings.duration);
  failed.add(res.status !== 200);
}

export function handleSummary(data) {
  return summaryWriter(data, ['op_get_ms']);
}
