-- POSTs pre-signed, distinct webhook bodies: line i of BODIES_FILE is "<signature>\t<body>".
-- Each request takes the next unused line, so no body is sent twice while the file lasts.
-- DELAY_MS (optional) paces every connection: an approximately open-loop rate for latency runs.
local bodies, sigs = {}, {}
local index = 0
local delay_ms = tonumber(os.getenv("DELAY_MS") or "0")

function init(args)
  for line in io.lines(os.getenv("BODIES_FILE")) do
    local tab = line:find("\t", 1, true)
    sigs[#sigs + 1] = line:sub(1, tab - 1)
    bodies[#bodies + 1] = line:sub(tab + 1)
  end
end

function request()
  index = index + 1
  if index > #bodies then index = 1 end -- only when the file is too short: reported by ingest.py
  return wrk.format("POST", "/webhooks/whatsapp", {
    ["Content-Type"] = "application/json",
    ["X-Hub-Signature-256"] = sigs[index],
  }, bodies[index])
end

function delay()
  return delay_ms
end
