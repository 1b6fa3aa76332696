// A Modbus TCP server on npm modbus-serial's ServerTCP, a stack fieldgate did not write, for interop tests.
// Usage: node server.js PORT [UNIT_ID]. Prints "listening PORT" once it accepts connections.
// Memory: 1000 holding registers, 100 input registers, 64 coils, 64 discrete inputs; reads or writes
// past the end answer exception 02. Preset values (PDU addresses) the tests check:
//   holding 100-101  f32 3.5 (ABCD)        holding 102-103 u32 305419896 (0x12345678)
//   holding 104      i16 -2 (0xFFFE)       holding 110-113 string "NODE-1" padded with NUL
//   holding 120      bit field 0b1010_0101 input   0-1   f32 -1.25           coil 3 on, discrete 5 on
"use strict";

const ModbusRTU = require("modbus-serial");

const port = Number(process.argv[2]);
const unitID = Number(process.argv[3] || 1);
if (!Number.isInteger(port) || port <= 0) {
    console.error("usage: node server.js PORT [UNIT_ID]");
    process.exit(2);
}

const holding = new Array(1000).fill(0);
const input = new Array(100).fill(0);
const coils = new Array(64).fill(false);
const discrete = new Array(64).fill(false);

function putF32(regs, addr, value) {
    const b = Buffer.alloc(4);
    b.writeFloatBE(value);
    regs[addr] = b.readUInt16BE(0);
    regs[addr + 1] = b.readUInt16BE(2);
}

putF32(holding, 100, 3.5);
holding[102] = 0x1234;
holding[103] = 0x5678;
holding[104] = 0xfffe;
Buffer.from("NODE-1\0\0", "ascii").forEach((byte, i) => {
    if (i % 2 === 0) holding[110 + i / 2] = byte << 8;
    else holding[110 + (i - 1) / 2] |= byte;
});
holding[120] = 0b10100101;
putF32(input, 0, -1.25);
coils[3] = true;
discrete[5] = true;

function check(regs, addr) {
    if (addr < 0 || addr >= regs.length) {
        throw { modbusErrorCode: 0x02, msg: `address ${addr} is not mapped` };
    }
}

const vector = {
    getHoldingRegister: (addr) => { check(holding, addr); return holding[addr]; },
    getInputRegister: (addr) => { check(input, addr); return input[addr]; },
    getCoil: (addr) => { check(coils, addr); return coils[addr]; },
    getDiscreteInput: (addr) => { check(discrete, addr); return discrete[addr]; },
    setRegister: (addr, value) => { check(holding, addr); holding[addr] = value; },
    setCoil: (addr, value) => { check(coils, addr); coils[addr] = Boolean(value); },
};

const server = new ModbusRTU.ServerTCP(vector, { host: "127.0.0.1", port, unitID });
server.on("initialized", () => console.log(`listening ${port}`));
server.on("serverError", (err) => { console.error("server error", err); process.exit(1); });
server.on("socketError", (err) => console.error("socket error", err));

function stop() {
    server.close(() => process.exit(0));
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
