-- Argo CD health check for tenancy.dev Tenant, Quota, FeatureFlag and SchemaRollout (one script for all).
-- Install: argocd-cm keys resource.customizations.health.tenancy.dev_<Kind> (see argocd-cm.yaml beside
-- this file). Written for Lua 5.1 as Argo CD's gopher-lua runs it; tested with lua5.1 and lua5.4
-- (tests/unit/test_argocd_health.py).
--
--   Progressing  no status yet, status.observedGeneration (or the Ready condition's) below
--                metadata.generation, Reconciling=True, Ready=Unknown, or being deleted
--   Degraded     Stalled=True, or Ready=False without Reconciling=True (a terminal failure)
--   Suspended    a Tenant with Ready=True whose phase is Suspended (spec.state: Suspended)
--   Rollouts     a SchemaRollout (status.phase) or a FeatureFlag's stepped rollout (status.rollout.phase):
--                Progressing while it rolls out, Suspended while Paused, Degraded when a
--                FeatureFlag's gate rolled it back (a SchemaRollout's halt is Stalled: Degraded)
--   Healthy      Ready=True and the status is about the current generation
local hs = { status = "Progressing", message = "Waiting for the operator to report status" }

local function condition(conditions, type_)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local text = c.reason or fallback
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local generation = 0
if obj.metadata ~= nil and obj.metadata.generation ~= nil then
  generation = obj.metadata.generation
end

if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.message = "Being deleted"
  return hs
end
if obj.status == nil then
  return hs
end
if obj.status.observedGeneration == nil or obj.status.observedGeneration < generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = obj.status.conditions
local ready = condition(conditions, "Ready")
local stalled = condition(conditions, "Stalled")
local reconciling = condition(conditions, "Reconciling")

if ready ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled, "Stalled")
  return hs
end
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(ready ~= nil and ready.status == "False" and ready or reconciling, "Reconciling")
  return hs
end
if ready == nil or ready.status == "Unknown" then
  hs.message = describe(ready, "Waiting for the Ready condition")
  return hs
end
if ready.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(ready, "NotReady")
  return hs
end
if obj.kind == "Tenant" and obj.status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(ready, "Suspended")
  return hs
end
local rollout = nil
if obj.kind == "SchemaRollout" then
  rollout = obj.status
elseif obj.kind == "FeatureFlag" then
  rollout = obj.status.rollout
end
if rollout ~= nil and rollout.phase ~= nil then
  local states = { Progressing = "Progressing", Paused = "Suspended", RolledBack = "Degraded" }
  if obj.kind == "SchemaRollout" and rollout.phase == "RolledBack" then
    -- asked for by a person: Progressing while Tenants run their down migrations, then done
    states.RolledBack = rollout.reason == "RollingBack" and "Progressing" or "Healthy"
  end
  if states[rollout.phase] ~= nil and states[rollout.phase] ~= "Healthy" then
    hs.status = states[rollout.phase]
    hs.message = rollout.phase .. ": " .. (rollout.message or "")
    return hs
  end
end
hs.status = "Healthy"
hs.message = describe(ready, "Ready")
return hs
