-- Replays prepared HTTP requests with wrk, each exactly once (bench/webhook.py).
--
--   wrk -t T -c C -d <watchdog> -s bench/webhook_replay.lua URL -- <requests file> <T> <dir>
--
-- The requests file holds "<byte length>\n<raw HTTP request>" records. Thread t sends the
-- records i with i % T == t, in file order, over its C/T connections; once a thread has
-- sent its slice its connections go idle (delay() returns an hour), and once it has all
-- its answers it stops and drops a marker file in <dir>. The last thread to finish sends
-- SIGINT to wrk, which otherwise sleeps for the whole -d before reporting. done() prints
-- machine-readable RESULT and STATUS lines for the Python runner.

local threads = {}
local next_tid = 0

function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
  table.insert(threads, thread)
end

function init(args)
  local path = args[1]
  nthreads = tonumber(args[2])
  donedir = args[3]
  local file = assert(io.open(path, "rb"))
  local data = file:read("*a")
  file:close()
  reqs = {}
  local pos, i = 1, 0
  while pos <= #data do
    local nl = data:find("\n", pos, true)
    local len = tonumber(data:sub(pos, nl - 1))
    if i % nthreads == tid then
      reqs[#reqs + 1] = data:sub(nl + 1, nl + len)
    end
    pos = nl + 1 + len
    i = i + 1
  end
  total = #reqs
  sent = 0
  received = 0
  statuses = {}
  started = false
end

function delay()
  started = true
  if sent >= total then
    return 3600000
  end
  return 0
end

function request()
  if not started then
    -- wrk calls request() once on thread 0 before the run to check the script's output;
    -- delay() always comes first in the run, so this call sends nothing: do not count it
    return reqs[1]
  end
  sent = sent + 1
  return reqs[sent]
end

local function all_done()
  for t = 0, nthreads - 1 do
    local marker = io.open(donedir .. "/" .. t, "r")
    if not marker then
      return false
    end
    marker:close()
  end
  return true
end

function response(status, headers, body)
  received = received + 1
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if received == total then
    local marker = assert(io.open(donedir .. "/" .. tid, "w"))
    marker:write("done\n")
    marker:close()
    wrk.thread:stop()
    if all_done() then
      -- not os.execute: system() ignores SIGINT in wrk while it waits for the shell
      local shell = io.popen("kill -INT $PPID")
      shell:close()
    end
  end
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT duration_us=%d requests=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d "
      .. "connect=%d read=%d write=%d timeout=%d\n",
    summary.duration, summary.requests, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.timeout))
  for status, n in pairs(counts) do
    io.write(string.format("STATUS %s %d\n", status, n))
  end
end
