-- Argo CD health check for trainguard.io/TrainingRun.
-- Pending/Queued/Running -> Progressing, Suspended -> Suspended (spec.suspend, or Kueue),
-- Succeeded -> Healthy, Failed -> Degraded, with the run's message.
local hs = {}
if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the trainguard operator to pick up the run"
  return hs
end
local phase = obj.status.phase
local message = obj.status.message or ""
if obj.status.reason ~= nil and obj.status.reason ~= "" then
  message = obj.status.reason .. ": " .. message
end
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Suspended" then
  hs.status = "Suspended"
elseif phase == "Pending" or phase == "Queued" or phase == "Running" then
  hs.status = "Progressing"
  if obj.status.progress ~= nil and obj.status.progress.percent ~= nil then
    message = message .. " (" .. tostring(obj.status.progress.percent) .. "%)"
  end
else
  hs.status = "Unknown"
end
hs.message = message
return hs
