-- Wireshark dissector for interface 1 of a vsock trace: the host side's events and the
-- engine's socket actions, encodings v1 to v4 (docs/trace-format.md), on link type USER0 (147).
-- It also names what Wireshark's vsock dissector leaves raw on interface 0: socket type 2
-- (seqpacket) and its EOM and EOR flags (fields vsockseq.type, vsockseq.eom, vsockseq.eor).
--
-- Use: tshark -X lua_script:trace/wireshark/vsock_events.lua -r FILE
--   or copy this file into Wireshark's personal plugins folder.
-- Filter fields: vsockev.kind, vsockev.conn, vsockev.code, vsockev.value,
--   vsockev.guest_port, vsockev.host_port, vsockev.data.

local p = Proto("vsockev", "vsock host event")

local kinds = {
    [1] = "START", [2] = "TX_WRITTEN", [3] = "ACCEPT", [4] = "CONNECT_LINE", [5] = "HOST",
    [6] = "HOST_WRITE", [7] = "TIMEOUT", [8] = "RESET_CONNECTION", [9] = "ABORT_ALL",
    [10] = "RESET", [11] = "POLL_RX", [12] = "RX_READ", [13] = "ACTION", [14] = "STOP",
    [15] = "SOCKET_TYPES", [16] = "PROBE", [17] = "RX_MESSAGE", [18] = "SIBLING_ACCEPT",
    [19] = "RESET_PEER",
}

-- What the code means, per kind; the value's meaning follows in brackets.
local io_codes = { [0] = "done [bytes]", [1] = "would block", [2] = "error [errno]" }
local codes = {
    [2] = { [0] = "done [bytes]", [1] = "would block", [2] = "error [errno]", [3] = "abandoned",
            [4] = "unreadable, done [bytes]", [5] = "unreadable, would block",
            [6] = "unreadable, error [errno]" },
    [3] = { [0] = "accepted [1 stream, 2 seqpacket]", [1] = "table full [1 stream, 2 seqpacket]" },
    [4] = { [0] = "bytes [count]", [1] = "end of file", [2] = "would block", [3] = "error [errno]" },
    [5] = { [0] = "connected", [1] = "connect failed [errno]", [2] = "readable", [3] = "writable",
            [4] = "error [errno]", [5] = "hang-up" },
    [6] = io_codes,
    [11] = { [0] = "nothing [room]", [1] = "packet [room]", [2] = "read [room]",
             [3] = "probe message [room]", [4] = "read message [room]" },
    [12] = io_codes,
    [13] = { [0] = "none", [1] = "connect [port]", [2] = "read connect line [max]",
             [3] = "flush", [4] = "shutdown [0 read, 1 write]",
             [5] = "interest [1 readable, 2 writable]", [6] = "close",
             [7] = "connect seqpacket [port]" },
    [18] = { [0] = "accepted [cid]", [1] = "table full [cid]", [2] = "socket type [cid]",
             [3] = "address [cid]", [4] = "in use [cid]" },
    [19] = { [0] = "sibling gone [cid]" },
    [15] = { [0] = "negotiated [1 stream, 2 seqpacket]" },
    [16] = { [0] = "message size [bytes]", [1] = "empty message", [2] = "end of file",
             [3] = "would block", [4] = "error [errno]" },
    [17] = io_codes,
}

local f = {
    version = ProtoField.uint8("vsockev.version", "Version"),
    kind = ProtoField.uint8("vsockev.kind", "Kind", base.DEC, kinds),
    hdr_len = ProtoField.uint16("vsockev.hdr_len", "Header length"),
    conn = ProtoField.string("vsockev.conn", "Connection"),
    index = ProtoField.uint32("vsockev.conn.index", "Connection slot"),
    generation = ProtoField.uint32("vsockev.conn.generation", "Connection generation"),
    code = ProtoField.uint32("vsockev.code", "Code"),
    value = ProtoField.uint64("vsockev.value", "Value"),
    guest_port = ProtoField.uint32("vsockev.guest_port", "Guest port"),
    host_port = ProtoField.uint32("vsockev.host_port", "Host port"),
    data = ProtoField.bytes("vsockev.data", "Data"),
}
p.fields = f

local e_short = ProtoExpert.new("vsockev.short", "Event record too short", expert.group.MALFORMED,
    expert.severity.ERROR)
local e_version = ProtoExpert.new("vsockev.version.unknown", "Unknown encoding version",
    expert.group.PROTOCOL, expert.severity.WARN)
p.experts = { e_short, e_version }

-- Whether an event names a connection: its kind and code say it (a handle may be any value,
-- all-ones included; events that name none carry all-ones).
local function names_conn(kind, code)
    if kind == 3 or kind == 18 then return code == 0 end    -- ACCEPT, SIBLING_ACCEPT
    if kind == 4 or kind == 5 or kind == 6 or kind == 8 or kind == 12 then return true end
    if kind == 16 or kind == 17 then return true end       -- PROBE, RX_MESSAGE
    if kind == 11 then return code >= 2 and code <= 4 end   -- POLL_RX: a read or probe grant
    if kind == 13 then return code ~= 0 end                 -- ACTION: any but none
    return false
end

function p.dissector(tvb, pinfo, tree)
    pinfo.cols.protocol = "vsockev"
    local t = tree:add(p, tvb())
    if tvb:len() < 32 then
        t:add_proto_expert_info(e_short)
        return
    end
    t:add_le(f.version, tvb(0, 1))
    -- Version 2 added the engine's state to START's data, version 3 seqpacket sockets,
    -- version 4 sibling VMs; the header is the same.
    local version = tvb(0, 1):uint()
    if version < 1 or version > 4 then
        t:add_proto_expert_info(e_version)
        return
    end
    local kind = tvb(1, 1):uint()
    t:add_le(f.kind, tvb(1, 1))
    local hdr_len = tvb(2, 2):le_uint()
    t:add_le(f.hdr_len, tvb(2, 2))
    local index = tvb(4, 4):le_uint()
    local generation = tvb(8, 4):le_uint()
    local code = tvb(12, 4):le_uint()
    local conn = ""
    if names_conn(kind, code) then
        conn = string.format("c%d.%d", index, generation)
        t:add(f.conn, tvb(4, 8), conn)
        t:add_le(f.index, tvb(4, 4))
        t:add_le(f.generation, tvb(8, 4))
    end
    local meaning = (codes[kind] or {})[code] or ""
    t:add_le(f.code, tvb(12, 4)):append_text(meaning ~= "" and (" (" .. meaning .. ")") or "")
    t:add_le(f.value, tvb(16, 8))
    t:add_le(f.guest_port, tvb(24, 4))
    t:add_le(f.host_port, tvb(28, 4))
    if hdr_len < tvb:len() then
        t:add(f.data, tvb(hdr_len))
    end

    local info = (kinds[kind] or ("kind " .. kind))
    if conn ~= "" then info = info .. " " .. conn end
    if meaning ~= "" then info = info .. " " .. meaning:gsub(" %[.*%]", "") end
    local value = tvb(16, 8):le_uint64()
    if kind == 13 and (code == 1 or code == 7) then
        -- A connect's value: the port, and from version 4 the CID in the upper half.
        local cid = tvb(20, 4):le_uint()
        info = info .. " " .. tostring(tvb(16, 4):le_uint())
        if version >= 4 and cid ~= 2 then info = info .. " of CID " .. tostring(cid) end
    elseif kind == 18 then
        info = info .. " from CID " .. tostring(tvb(16, 4):le_uint())
    elseif meaning:find("%[") then
        info = info .. " " .. tostring(value)
    end
    local gp, hp = tvb(24, 4):le_uint(), tvb(28, 4):le_uint()
    if gp ~= 0 or hp ~= 0 then info = info .. string.format(" (guest %d, host %d)", gp, hp) end
    pinfo.cols.info = info
end

DissectorTable.get("wtap_encap"):add(wtap.USER0, p)

-- Seqpacket on interface 0: Wireshark's vsock dissector shows the virtio header's type and
-- flags as numbers; this names type 2 and decodes EOM (bit 0) and EOR (bit 1) of RW packets.
local seq = Proto("vsockseq", "vsock seqpacket")
local sf = {
    type = ProtoField.string("vsockseq.type", "Socket type"),
    eom = ProtoField.bool("vsockseq.eom", "End of message"),
    eor = ProtoField.bool("vsockseq.eor", "End of record"),
}
seq.fields = sf
local virtio_type = Field.new("vsock.virtio.type")
local virtio_op = Field.new("vsock.virtio.op")
local virtio_flags = Field.new("vsock.virtio.flags")

function seq.dissector(tvb, pinfo, tree)
    local ty = virtio_type()
    if ty == nil or ty.value ~= 2 then return end
    local t = tree:add(seq)
    t:add(sf.type, "seqpacket")
    local op, flags = virtio_op(), virtio_flags()
    if op ~= nil and op.value == 5 and flags ~= nil then
        local eom = bit.band(flags.value, 1) ~= 0
        local eor = bit.band(flags.value, 2) ~= 0
        t:add(sf.eom, eom)
        t:add(sf.eor, eor)
        if eom then pinfo.cols.info:append(" [EOM]") end
        if eor then pinfo.cols.info:append(" [EOR]") end
    end
end

register_postdissector(seq)
