-- wrk script for benches/compare.sh: every request carries the next key of a key list, so the
-- proxies look up the whole key set rather than one hot entry.
--
--   wrk ... -s benches/compare/cycle.lua URL -- KEYS_FILE [SCHEME]
--
-- Requests are formatted once per thread in init(): building a string per request would make
-- wrk, not the proxy, the bottleneck. done() prints one machine-readable line:
--   STATS <requests> <non-2xx/3xx> <socket errors> <p50 us> <p99 us>
local reqs, n, i = {}, 0, 0

function init(args)
  local scheme = args[2] or "Api-Key"
  for key in io.lines(args[1]) do
    n = n + 1
    reqs[n] = wrk.format(nil, nil, { Authorization = scheme .. " " .. key })
  end
  if n == 0 then
    error("no keys in " .. args[1])
  end
end

function request()
  i = i % n + 1
  return reqs[i]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format("STATS %d %d %d %d %d\n", summary.requests, e.status,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
