--- Ghostloop for Neovim >= 0.12: ghost-text completions from `ghostloop serve` through
--- vim.lsp.inline_completion, and the feedback that lets the nightly job learn from them.
---
--- What reaches the server (lsp_server/protocol.py):
--- - shown: a suggestion arrived and was drawn (ghostloop/feedback "shown");
--- - accepted: <Tab> takes all of it (the item's own ghostloop.accept command), <C-Right>
---   the next word and <C-Down> the next line (ghostloop.accept with that length);
--- - dismissed: <C-e>, or leaving insert mode, while a suggestion is visible;
--- - rejected: typing on without taking it (the server's own rule: a newer request for
---   the document supersedes it).
--- With `telemetry = false` the server records nothing about your code.

local M = {}

local ACCEPT_COMMAND = 'ghostloop.accept'
local FEEDBACK = 'ghostloop/feedback'
local STATUS = 'ghostloop/status'
local INLINE = 'textDocument/inlineCompletion'

---@class ghostloop.Keymaps
---@field accept? string|false
---@field accept_word? string|false
---@field accept_line? string|false
---@field dismiss? string|false
---@field next? string|false
---@field prev? string|false

---@class ghostloop.Options
---@field cmd? string[] the server command (default: { 'ghostloop', 'serve' })
---@field cmd_env? table<string, string> extra environment for the server
---@field address? string host:port of a shared `ghostloop serve --tcp` instead of cmd
---@field token? string|fun():string a team server's access token, or a function that
---  returns it (e.g. from a password manager); default: $GHOSTLOOP_TOKEN. Keep it out of
---  your dotfiles.
---@field filetypes? string[] only these filetypes (default: every buffer with a file)
---@field root_markers? string[] (default: { '.git' })
---@field telemetry? boolean record what happens to suggestions (default: true)
---@field server_options? table further Ghostloop settings (initializationOptions)
---@field keymaps? ghostloop.Keymaps insert-mode keys; false turns one off
---@field enabled? boolean start with completions on (default: true)

---@type ghostloop.Options
M.defaults = {
  cmd = { 'ghostloop', 'serve' },
  cmd_env = {},
  address = nil,
  token = nil,
  filetypes = nil,
  root_markers = { '.git' },
  telemetry = true,
  server_options = {},
  keymaps = {
    accept = '<Tab>',
    accept_word = '<C-Right>',
    accept_line = '<C-Down>',
    dismiss = '<C-e>',
    next = '<M-]>',
    prev = '<M-[>',
  },
  enabled = true,
}

---@type ghostloop.Options
M.options = vim.deepcopy(M.defaults)

--- The suggestion each buffer shows: { client_id, id, text, row, col } (0-based, bytes).
---@type table<integer, table?>
local shown = {}

local namespace = vim.api.nvim_create_namespace('nvim.lsp.inline_completion')

local function notify_error(message)
  vim.notify('ghostloop: ' .. message, vim.log.levels.ERROR)
end

--- Code points, as the server counts a suggestion's characters.
---@param text string
---@return integer
function M.code_points(text)
  return vim.str_utfindex(text, 'utf-32')
end

---@param address string
---@return string host, integer port
function M.parse_address(address)
  local host, port = address:match('^%[(.+)%]:(%d+)$')
  if not host then
    host, port = address:match('^([^:]+):(%d+)$')
  end
  port = tonumber(port)
  if not host or not port or port < 1 or port > 65535 then
    error(('address must be host:port (e.g. 127.0.0.1:2087), got %q'):format(address), 0)
  end
  return host, port
end

--- The next piece of `rest` that a word or line accept takes (VS Code's rules: a word is
--- leading blanks and a run of word characters or of punctuation; a line runs to the
--- end of the line, or is the next line when `rest` starts with a line break).
---@param rest string
---@param unit 'word'|'line'
---@return string
function M.next_piece(rest, unit)
  if unit == 'line' then
    if rest:sub(1, 1) == '\n' then
      return '\n' .. (rest:sub(2):match('^[^\n]*') or '')
    end
    return rest:match('^[^\n]*') or ''
  end
  return rest:match('^%s*[%w_]+') or rest:match('^%s*[^%w_%s]+') or rest:match('^%s+') or rest
end

---@return vim.lsp.Client[]
local function clients(bufnr)
  return vim.lsp.get_clients({ name = 'ghostloop', bufnr = bufnr })
end

---@param client_id integer
---@param completion_id string
---@param kind 'shown'|'dismissed'
local function signal(client_id, completion_id, kind)
  local client = vim.lsp.get_client_by_id(client_id)
  if client then
    client:notify(FEEDBACK, { completionId = completion_id, kind = kind })
  end
end

local function visible(bufnr)
  return #vim.api.nvim_buf_get_extmarks(bufnr, namespace, 0, -1, { limit = 1 }) > 0
end

--- Watch the inline completions this client answers: which suggestion a buffer shows.
---@param client vim.lsp.Client
local function watch(client)
  if client._ghostloop_watched then
    return
  end
  client._ghostloop_watched = true
  local request = client.request
  ---@diagnostic disable-next-line: duplicate-set-field
  client.request = function(self, method, params, handler, bufnr)
    if method ~= INLINE or not handler then
      return request(self, method, params, handler, bufnr)
    end
    local function record(err, result, ctx)
      handler(err, result, ctx)
      local items = result and (result.items or result) or {}
      local item = items[1]
      local buf = ctx.bufnr
      shown[buf] = nil
      if err or not item or type(item.insertText) ~= 'string' or item.insertText == '' then
        return
      end
      local command = item.command
      if not command or command.command ~= ACCEPT_COMMAND or not command.arguments then
        return
      end
      local id = command.arguments[1]
      local position = params.position
      local line = vim.api.nvim_buf_get_lines(buf, position.line, position.line + 1, false)[1]
      local col = line and vim.str_byteindex(line, self.offset_encoding, position.character, false)
        or 0
      shown[buf] = { client_id = ctx.client_id, id = id, text = item.insertText, row = position.line, col = col }
      if visible(buf) then
        signal(ctx.client_id, id, 'shown')
      end
    end
    return request(self, method, params, record, bufnr)
  end
end

--- The suggestion now shown in `bufnr` and the part of it the user already typed.
local function current(bufnr)
  local entry = shown[bufnr]
  if not entry or not visible(bufnr) then
    return nil
  end
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  row = row - 1
  if row ~= entry.row or col < entry.col then
    return nil
  end
  local line = vim.api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ''
  local typed = line:sub(entry.col + 1, col)
  if entry.text:sub(1, #typed) ~= typed then
    return nil
  end
  return entry, typed
end

---@param entry table
---@param length integer code points of the suggestion now in the buffer
local function accept(entry, length)
  local client = vim.lsp.get_client_by_id(entry.client_id)
  if client then
    client:exec_cmd({ title = 'accept', command = ACCEPT_COMMAND, arguments = { entry.id, length } })
  end
end

--- The suggestion on screen in `bufnr` (for statuslines and tests): { id, text } or nil.
---@param bufnr? integer
---@return table?
function M.suggestion(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  local entry = shown[bufnr]
  if not entry or not visible(bufnr) then
    return nil
  end
  return { id = entry.id, text = entry.text }
end

--- Accept the whole suggestion (the built-in accept runs the item's command).
---@return boolean taken whether a suggestion was there to take
function M.accept()
  local bufnr = vim.api.nvim_get_current_buf()
  local taken = vim.lsp.inline_completion.get()
  if taken then
    shown[bufnr] = nil
  end
  return taken
end

--- Accept the next word or line of the suggestion, and tell the server how much.
---@param unit 'word'|'line'
---@return boolean taken
function M.accept_part(unit)
  local bufnr = vim.api.nvim_get_current_buf()
  local entry, typed = current(bufnr)
  if not entry then
    return false
  end
  local piece = M.next_piece(entry.text:sub(#typed + 1), unit)
  if piece == '' then
    return false
  end
  shown[bufnr] = nil
  -- get() with a handler of our own: the built-in hides the suggestion and hands it over.
  return vim.lsp.inline_completion.get({
    on_accept = function()
      local row, col = unpack(vim.api.nvim_win_get_cursor(0))
      local lines = vim.split(piece, '\n', { plain = true })
      vim.api.nvim_buf_set_text(bufnr, row - 1, col, row - 1, col, lines)
      local last = #lines == 1 and col + #lines[1] or #lines[#lines]
      vim.api.nvim_win_set_cursor(0, { row + #lines - 1, last })
      accept(entry, M.code_points(typed .. piece))
    end,
  })
end

--- Dismiss the suggestion shown in the current buffer.
---@return boolean dismissed whether one was shown
function M.dismiss()
  local bufnr = vim.api.nvim_get_current_buf()
  local entry = shown[bufnr]
  if not entry or not visible(bufnr) then
    return false
  end
  shown[bufnr] = nil
  vim.lsp.inline_completion.get({
    on_accept = function()
      signal(entry.client_id, entry.id, 'dismissed')
    end,
  })
  return true
end

local function map_keys(keymaps)
  local function map(lhs, fallback_when_none, action, desc)
    if not lhs then
      return
    end
    vim.keymap.set('i', lhs, function()
      if action() then
        return ''
      end
      return fallback_when_none and lhs or ''
    end, { expr = true, replace_keycodes = true, desc = desc })
  end
  map(keymaps.accept, true, M.accept, 'Ghostloop: accept the suggestion')
  map(keymaps.accept_word, true, function()
    return M.accept_part('word')
  end, 'Ghostloop: accept the next word')
  map(keymaps.accept_line, true, function()
    return M.accept_part('line')
  end, 'Ghostloop: accept the next line')
  map(keymaps.dismiss, true, M.dismiss, 'Ghostloop: dismiss the suggestion')
  if keymaps.next then
    vim.keymap.set('i', keymaps.next, function()
      vim.lsp.inline_completion.select({ count = 1 })
    end, { desc = 'Ghostloop: next suggestion' })
  end
  if keymaps.prev then
    vim.keymap.set('i', keymaps.prev, function()
      vim.lsp.inline_completion.select({ count = -1 })
    end, { desc = 'Ghostloop: previous suggestion' })
  end
end

--- The access token sent at initialize (a server started over stdio ignores it).
---@param options ghostloop.Options
---@return string?
function M.token(options)
  local token = options.token
  if type(token) == 'function' then
    token = token()
  end
  if token == nil then
    token = vim.env.GHOSTLOOP_TOKEN
  end
  if token == nil or token == '' then
    return nil
  end
  if type(token) ~= 'string' then
    error(('token must be a string or a function returning one, got %s'):format(type(token)), 0)
  end
  return vim.trim(token)
end

---@return table config for vim.lsp.config
local function lsp_config(options)
  local cmd = options.cmd
  if options.address and options.address ~= '' then
    local host, port = M.parse_address(options.address)
    cmd = vim.lsp.rpc.connect(host, port)
  elseif type(cmd) ~= 'table' or type(cmd[1]) ~= 'string' or cmd[1] == '' then
    error("cmd must be a list like { 'ghostloop', 'serve' }", 0)
  end
  local init_options = vim.deepcopy(options.server_options or {})
  -- Opting out is final: a telemetry key in server_options cannot turn it back on.
  init_options.telemetry = options.telemetry ~= false and init_options.telemetry ~= false
  init_options.token = M.token(options)
  return {
    cmd = cmd,
    cmd_env = options.cmd_env,
    filetypes = options.filetypes,
    root_markers = options.root_markers,
    init_options = init_options,
    on_attach = function(client)
      watch(client)
    end,
  }
end

--- Ask the server for its status (model, adapter, state); nil and a reason when it cannot.
---@param bufnr? integer
---@return table? status, string? why
function M.status(bufnr)
  local client = clients(bufnr)[1] or clients()[1]
  if not client then
    return nil, 'no Ghostloop server is attached (open a file, or check :checkhealth ghostloop)'
  end
  local response, err = client:request_sync(STATUS, nil, 3000, bufnr or 0)
  if not response then
    return nil, 'the server did not answer ghostloop/status: ' .. tostring(err)
  end
  if response.err then
    return nil, 'ghostloop/status failed: ' .. tostring(response.err.message)
  end
  return response.result, nil
end

--- Completions on or off (the server keeps running).
---@param enable boolean
function M.enable(enable)
  vim.lsp.inline_completion.enable(enable)
  if not enable then
    for bufnr in pairs(shown) do
      shown[bufnr] = nil
    end
  end
end

local function command(opts)
  local action = opts.fargs[1] or 'status'
  if action == 'enable' then
    M.enable(true)
  elseif action == 'disable' then
    M.enable(false)
  elseif action == 'toggle' then
    M.enable(not vim.lsp.inline_completion.is_enabled())
  elseif action == 'restart' then
    for _, client in ipairs(clients()) do
      client:stop()
    end
    vim.defer_fn(function()
      vim.lsp.enable('ghostloop', false)
      vim.lsp.enable('ghostloop')
    end, 500)
  elseif action == 'status' then
    local status, why = M.status(0)
    if not status then
      notify_error(why)
      return
    end
    print(
      ('ghostloop: %s, model %s, adapter %s%s'):format(
        status.state,
        tostring(status.model),
        status.adapter or 'base',
        status.error ~= vim.NIL and status.error and (', error: ' .. status.error) or ''
      )
    )
  else
    notify_error(('unknown subcommand %q: use enable, disable, toggle, restart or status'):format(action))
  end
end

---@param opts? ghostloop.Options
function M.setup(opts)
  if vim.fn.has('nvim-0.12') == 0 or not vim.lsp.inline_completion then
    notify_error('needs Neovim 0.12 or newer (vim.lsp.inline_completion)')
    return
  end
  local options = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), opts or {})
  local ok, config = pcall(lsp_config, options)
  if not ok then
    notify_error(config)
    return
  end
  M.options = options
  vim.lsp.config('ghostloop', config)
  vim.lsp.enable('ghostloop')
  M.enable(options.enabled ~= false)
  map_keys(options.keymaps or {})

  local group = vim.api.nvim_create_augroup('ghostloop', { clear = true })
  -- Leaving insert mode with a suggestion on screen dismisses it (Escape, as in VS Code).
  -- This runs before the built-in's own InsertLeave handler, which hides the suggestion.
  vim.api.nvim_create_autocmd('InsertLeave', {
    group = group,
    callback = function(args)
      local entry = shown[args.buf]
      if entry and visible(args.buf) then
        signal(entry.client_id, entry.id, 'dismissed')
      end
      shown[args.buf] = nil
    end,
  })
  vim.api.nvim_create_user_command('Ghostloop', command, {
    nargs = '?',
    complete = function()
      return { 'enable', 'disable', 'toggle', 'restart', 'status' }
    end,
    desc = 'Ghostloop: enable | disable | toggle | restart | status',
  })
end

return M
