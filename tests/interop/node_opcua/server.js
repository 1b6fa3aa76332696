// An OPC UA server built on node-opcua, an implementation fieldgate did not write, for interop tests.
//
// Usage: node server.js [port]    (or OPCUA_PORT=...; default 48010). Binds 127.0.0.1 only.
// Prints "node-opcua server listening on <endpoint>" on stdout once it accepts connections.
//
// Address space (namespace 1, string node ids so tests can address by NodeId or by browse path):
//   Objects/Wellsite/Well01/TubingPressure   ns=1;s=Well01.TubingPressure   Double, changes every 200 ms
//   Objects/Wellsite/Well01/Temperature      ns=1;s=Well01.Temperature      Double, constant 42.5
//   Objects/Wellsite/Well01/RunStatus        ns=1;s=Well01.RunStatus        Boolean, true
//   Objects/Wellsite/Well01/Setpoint         ns=1;s=Well01.Setpoint         Double, writable
//   Objects/Wellsite/Well01/Faulty           ns=1;s=Well01.Faulty           Double, status BadSensorFailure
// Everything but Setpoint is read-only.
"use strict";
const { OPCUAServer } = require("node-opcua-server");
const { Variant, DataType } = require("node-opcua-variant");
const { StatusCodes } = require("node-opcua-status-code");
const { nodesets } = require("node-opcua-nodesets");

const port = Number(process.argv[2] || process.env.OPCUA_PORT || 48010);

async function main() {
    const server = new OPCUAServer({
        port,
        hostname: "127.0.0.1",
        resourcePath: "/fieldgate/interop",
        nodeset_filename: [nodesets.standard],
        buildInfo: { productName: "fieldgate-interop-node-opcua" },
        // Tests connect with SecurityPolicy None and anonymous identity.
        allowAnonymous: true,
    });
    await server.initialize();

    const addressSpace = server.engine.addressSpace;
    const namespace = addressSpace.getOwnNamespace();
    const wellsite = namespace.addObject({ organizedBy: addressSpace.rootFolder.objects, browseName: "Wellsite" });
    const well = namespace.addObject({ componentOf: wellsite, browseName: "Well01" });

    let tubing = 2.5;
    const timer = setInterval(() => {
        tubing = Math.round((tubing + 0.01) * 1000) / 1000;
        tubingVar.setValueFromSource(new Variant({ dataType: DataType.Double, value: tubing }));
    }, 200);
    const tubingVar = namespace.addVariable({
        componentOf: well,
        browseName: "TubingPressure",
        nodeId: "s=Well01.TubingPressure",
        accessLevel: "CurrentRead",
        userAccessLevel: "CurrentRead",
        dataType: "Double",
        value: new Variant({ dataType: DataType.Double, value: tubing }),
    });
    namespace.addVariable({
        componentOf: well,
        browseName: "Temperature",
        nodeId: "s=Well01.Temperature",
        accessLevel: "CurrentRead",
        userAccessLevel: "CurrentRead",
        dataType: "Double",
        value: new Variant({ dataType: DataType.Double, value: 42.5 }),
    });
    namespace.addVariable({
        componentOf: well,
        browseName: "RunStatus",
        nodeId: "s=Well01.RunStatus",
        accessLevel: "CurrentRead",
        userAccessLevel: "CurrentRead",
        dataType: "Boolean",
        value: new Variant({ dataType: DataType.Boolean, value: true }),
    });
    namespace.addVariable({
        componentOf: well,
        browseName: "Setpoint",
        nodeId: "s=Well01.Setpoint",
        dataType: "Double",
        accessLevel: "CurrentRead | CurrentWrite",
        userAccessLevel: "CurrentRead | CurrentWrite",
        value: new Variant({ dataType: DataType.Double, value: 10.0 }),
    });
    const faulty = namespace.addVariable({
        componentOf: well,
        browseName: "Faulty",
        nodeId: "s=Well01.Faulty",
        accessLevel: "CurrentRead",
        userAccessLevel: "CurrentRead",
        dataType: "Double",
        value: new Variant({ dataType: DataType.Double, value: 0.0 }),
    });
    faulty.setValueFromSource(new Variant({ dataType: DataType.Double, value: 0.0 }), StatusCodes.BadSensorFailure);

    await server.start();
    process.stdout.write(`node-opcua server listening on ${server.getEndpointUrl()}\n`);

    const stop = async () => {
        clearInterval(timer);
        await server.shutdown(0);
        process.exit(0);
    };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
}

main().catch((err) => {
    process.stderr.write(`node-opcua server failed: ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
});
