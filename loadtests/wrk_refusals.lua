-- wrk script: POST the file named by the first script argument as JSON and check every answer: a 503 must say
-- when to retry (Retry-After, in seconds) and why (a JSON body with "error"). Prints the counts as JSON last.
--   wrk -t1 -c32 -d10s -s loadtests/wrk_refusals.lua URL -- body.json

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.body = file:read("*a")
  file:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  answered, refused, refused_unexplained, other = 0, 0, 0, 0
end

function response(status, headers, body)
  if status == 200 then
    answered = answered + 1
  elseif status == 503 then
    refused = refused + 1
    local retry_after = headers["Retry-After"] or headers["retry-after"]
    local said_when = retry_after ~= nil and string.match(retry_after, "^%d+$") ~= nil
    if not said_when or not string.find(body, '"error"', 1, true) then
      refused_unexplained = refused_unexplained + 1
    end
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local counts = {answered = 0, refused = 0, refused_unexplained = 0, other = 0}
  for _, thread in ipairs(threads) do
    for name, _ in pairs(counts) do
      counts[name] = counts[name] + thread:get(name)
    end
  end
  io.write(string.format(
    '{"answered": %d, "refused": %d, "refused_unexplained": %d, "other": %d, "socket_errors": %d}\n',
    counts.answered, counts.refused, counts.refused_unexplained, counts.other,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
