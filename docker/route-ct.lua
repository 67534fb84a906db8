-- Orthanc PACS of docker-compose.yml: send every stable CT series to the lungburden node
-- (an asynchronous Orthanc job). The node returns a SEG and an SR, which are not CT: no loop.
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'CT' then
    RestApiPost('/modalities/lungburden/store',
                '{"Resources": ["' .. seriesId .. '"], "Asynchronous": true}')
  end
end
