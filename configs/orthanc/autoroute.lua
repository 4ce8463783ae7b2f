-- Orthanc auto-routing for CoroNet (used by `coronet run` and docker-compose.yml).
--
-- Every chest radiograph stored in this Orthanc (CR, or DX for presentation or processing) is
-- forwarded to the CoroNet node, which must be registered in Orthanc's "DicomModalities" under
-- the name "coronet".  CoroNet's own results -- the DICOM SR (Modality SR) and the heatmap
-- Secondary Capture (Modality OT) -- are never forwarded, so nothing loops between Orthanc and
-- the node: both the Modality and the SOP Class must be on the lists below.

local TARGET = 'coronet'

local ROUTED_MODALITIES = { CR = true, DX = true }

local ROUTED_SOP_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.1'] = true,      -- Computed Radiography Image Storage
  ['1.2.840.10008.5.1.4.1.1.1.1'] = true,    -- Digital X-Ray Image Storage - For Presentation
  ['1.2.840.10008.5.1.4.1.1.1.1.1'] = true,  -- Digital X-Ray Image Storage - For Processing
}

function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags['Modality']
  local sopClass = tags['SOPClassUID'] or metadata['SopClassUid']
  if not ROUTED_MODALITIES[modality] or not ROUTED_SOP_CLASSES[sopClass] then
    return
  end
  -- Instances that Lua itself stored are not routed again.
  if origin ~= nil and origin['RequestOrigin'] == 'Lua' then
    return
  end
  print('CoroNet auto-route: forwarding a ' .. modality .. ' instance to ' .. TARGET)
  SendToModality(instanceId, TARGET)
end
