-- pacsai auto-routing for Orthanc: forward each stable series to pacsai, except pacsai's own results.
-- Install: add this file to "LuaScripts" in orthanc.json and declare pacsai in "DicomModalities" under the
-- name in PACSAI_MODALITY below. Tune "StableAge" (seconds without new instances before a series is stable).

PACSAI_MODALITY = 'pacsai'
-- Result types pacsai produces; forwarding them back would only make pacsai say "no model".
SKIPPED_MODALITIES = { SEG = true, SR = true, PR = true, KO = true, DOC = true }

local function CameFromPacsai(seriesId)
   local series = ParseJson(RestApiGet('/series/' .. seriesId))
   local first = series['Instances'][1]
   if first == nil then
      return false
   end
   local ok, origin = pcall(RestApiGet, '/instances/' .. first .. '/metadata/RemoteAET')
   local manufacturer = series['MainDicomTags']['Manufacturer'] or ''
   return manufacturer == 'pacsai' or (ok and origin == 'PACSAI')
end

function OnStableSeries(seriesId, tags, metadata)
   local modality = tags['Modality'] or ''
   if SKIPPED_MODALITIES[modality] or CameFromPacsai(seriesId) then
      return
   end
   print('pacsai-autoroute: forwarding a stable ' .. modality .. ' series to ' .. PACSAI_MODALITY)
   local job = { Resources = { seriesId }, Asynchronous = true }
   RestApiPost('/modalities/' .. PACSAI_MODALITY .. '/store', DumpJson(job, true))
end
