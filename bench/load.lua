-- wrk script of `make bench`: POSTs the AdmissionReview, its namespace varied per request.
-- Arguments (after --): BODIES_FILE (one JSON body per line) MAX_REQUESTS (per thread; 0 = none).
-- Prints one line "BENCH_RESULT {json}" with counts and latency percentiles in microseconds.

local requests = {}
local count = 0
local next_index = 0
local max_requests = 0

function init(args)
  local path = args[1]
  max_requests = tonumber(args[2] or "0") or 0
  local headers = {["Content-Type"] = "application/json"}
  for line in io.lines(path) do
    if #line > 0 then
      requests[#requests + 1] = wrk.format("POST", nil, headers, line)
    end
  end
  if #requests == 0 then
    error("no request bodies in " .. path)
  end
  -- threads start at different namespaces
  next_index = (tonumber(tostring({}):match("0x(%x+)"), 16) or 0) % #requests
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end

function response(status, headers, body)
  count = count + 1
  if max_requests > 0 and count >= max_requests then
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
