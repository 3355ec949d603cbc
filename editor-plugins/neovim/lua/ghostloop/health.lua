--- :checkhealth ghostloop -- the editor, the server command and what the server serves.
local M = {}

local function report_status(client)
  local response, err = client:request_sync('ghostloop/status', nil, 3000, 0)
  if not response then
    vim.health.error(('server %d did not answer ghostloop/status: %s'):format(client.id, tostring(err)))
    return
  end
  if response.err then
    vim.health.error('ghostloop/status failed: ' .. tostring(response.err.message))
    return
  end
  local status = response.result
  local function text(value)
    return (value == nil or value == vim.NIL) and '-' or tostring(value)
  end
  local summary = ('model %s on %s (%s backend), adapter %s'):format(
    text(status.model),
    text(status.device),
    text(status.backend),
    status.adapter ~= vim.NIL and status.adapter or 'base (no adapter)'
  )
  if status.state == 'ready' then
    vim.health.ok('server ready: ' .. summary)
  elseif status.state == 'starting' then
    vim.health.warn('server still loading the model: ' .. summary, 'wait a few seconds and run it again')
  else
    vim.health.error('server error: ' .. text(status.error), 'fix the model setting, then :Ghostloop restart')
  end
  local export = status.onnx_export
  if export == 'running' then
    vim.health.info('served by ' .. text(status.backend) .. ' while the model is exported for onnxruntime (faster on a CPU); it switches by itself')
  elseif type(export) == 'string' and export:sub(1, 6) == 'failed' then
    vim.health.warn('the onnxruntime export ' .. export .. '; ' .. text(status.backend) .. ' serves', 'see :LspLog; GHOSTLOOP_BACKEND=torch serves on torch without trying')
  end
  local recording = status.recorder
  if type(recording) == 'table' and recording.telemetry == false then
    vim.health.info('telemetry off: nothing about your code is recorded')
  end
end

function M.check()
  vim.health.start('ghostloop')
  if vim.fn.has('nvim-0.12') == 1 and vim.lsp.inline_completion then
    vim.health.ok('Neovim ' .. tostring(vim.version()) .. ' has vim.lsp.inline_completion')
  else
    vim.health.error('Neovim 0.12 or newer is needed (vim.lsp.inline_completion)')
    return
  end
  local ghostloop = require('ghostloop')
  local options = ghostloop.options
  if options.address and options.address ~= '' then
    vim.health.info('connects to ' .. options.address)
  else
    local executable = options.cmd and options.cmd[1]
    if executable and vim.fn.executable(executable) == 1 then
      vim.health.ok(('server command: %s'):format(table.concat(options.cmd, ' ')))
    else
      vim.health.error(
        ('server command %q is not executable'):format(tostring(executable)),
        "pip install ghostloop, or set cmd = { '/path/to/ghostloop', 'serve' } in setup()"
      )
    end
  end
  if vim.lsp.inline_completion.is_enabled() then
    vim.health.ok('inline completion enabled')
  else
    vim.health.warn('inline completion disabled', ':Ghostloop enable')
  end
  local clients = vim.lsp.get_clients({ name = 'ghostloop' })
  if #clients == 0 then
    vim.health.warn('no Ghostloop server running', 'open a file the server is configured for')
    return
  end
  for _, client in ipairs(clients) do
    report_status(client)
  end
end

return M
