// The Cake System's auth mix at a fixed arrival rate: 70 % login (account by username /
// e-mail / phone 40/40/20; 20 % of logins followed by a refresh), 20 % register, 10 % profile.
// Users come from USERS_FILE (seeded and logged in once by bench/run.py).
// Env: GATEWAY, USERS_FILE, RATE (iterations/s), DURATION, MIX ("70/20/10" login/register/profile).
import { SharedArray } from 'k6/data';
import { Counter, Rate, Trend } from 'k6/metrics';
import { get, post, summaryWriter, TREND_STATS, uniqueSuffix } from './lib.js';

const users = new SharedArray('users', () => JSON.parse(open(__ENV.USERS_FILE)).users);
const [LOGIN_PCT, REGISTER_PCT] = (__ENV.MIX || '70/20/10').split('/').map(Number);
const RATE = Number(__ENV.RATE || 20);

const trends = {
  login: new Trend('op_login_ms', true),
  refresh: new Trend('op_refresh_ms', true),
  register: new Trend('op_register_ms', true),
  profile: new Trend('op_profile_ms', true),
};
const failures = {
  login: new Rate('op_login_failed'),
  refresh: new Rate('op_refresh_failed'),
  register: new Rate('op_register_failed'),
  profile: new Rate('op_profile_failed'),
};
const done = new Counter('op_ok');

export const options = {
  discardResponseBodies: false,
  summaryTrendStats: TREND_STATS,
  scenarios: {
    mix: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: __ENV.DURATION || '20s',
      preAllocatedVUs: Math.max(10, RATE * 2),
      maxVUs: Math.max(50, RATE * 20),
    },
  },
};

function record(op, response, okStatus) {
  const ok = response.status === okStatus;
  trends[op].add(response.timings.duration, { ok: String(ok) });
  failures[op].add(!ok);
  if (ok) done.add(1, { op });
  return ok;
}

function pickAccount(user) {
  const r = Math.random() * 100;
  if (r < 40) return user.username;
  if (r < 80) return user.email;
  return user.phone;
}

export default function () {
  const r = Math.random() * 100;
  const user = users[Math.floor(Math.random() * users.length)];
  if (r < LOGIN_PCT) {
    const res = post('/auth/login', { account: pickAccount(user), password: user.password }, null, null, 'login');
    if (record('login', res, 200) && Math.random() < 0.2) {
      const token = res.json('access_token');
      record('refresh', post('/auth/refresh', {}, token, null, 'refresh'), 200);
    }
  } else if (r < LOGIN_PCT + REGISTER_PCT) {
    const s = uniqueSuffix();
    const digits = String(Math.floor(Math.random() * 1e7)).padStart(7, '0');
    const body = {
      fullname: 'Bench Mix', email: `m${s}@bench.example.com`, username: `m${s}`,
      phone: `+8492${digits}`, password: 'bench-pass-123', birthday: '1995-06-01',
    };
    record('register', post('/auth/register', body, null, null, 'register'), 201);
  } else {
    record('profile', get('/auth/profile', user.token, 'profile'), 200);
  }
}

export function handleSummary(data) {
  return summaryWriter(data, ['op_login_ms', 'op_refresh_ms', 'op_register_ms', 'op_profile_ms']);
}
