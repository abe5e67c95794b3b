// Profile reads through the gateway at full speed (closed model: VUS clients in a loop),
// to compare with the same reads over raw gRPC (bench/run.py measures those).
// Env: GATEWAY, USERS_FILE, VUS, DURATION.
import { SharedArray } from 'k6/data';
import { Rate, Trend } from 'k6/metrics';
import { get, summaryWriter, TREND_STATS } from './lib.js';

const users = new SharedArray('users', () => JSON.parse(open(__ENV.USERS_FILE)).users);
const latency = new Trend('op_profile_ms', true);
const failed = new Rate('op_profile_failed');

export const options = {
  summaryTrendStats: TREND_STATS,
  scenarios: {
    reads: { executor: 'constant-vus', vus: Number(__ENV.VUS || 16), duration: __ENV.DURATION || '10s' },
  },
};

export default function () {
  const user = users[(__VU * 7919 + __ITER) % users.length];
  const res = get('/auth/profile', user.token, 'profile');
  latency.add(res.timings.duration);
  failed.add(res.status !== 200);
}

export function handleSummary(data) {
  return summaryWriter(data, ['op_profile_ms']);
}
