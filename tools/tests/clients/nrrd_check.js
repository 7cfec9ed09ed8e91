// Parses a label file with nrrd-js 0.2.1, the NRRD parser OHIF v3's monai-label extension uses, and prints what
// OHIF reads of it: usage `node nrrd_check.js FILE` (NODE_PATH pointing at the node_modules holding nrrd-js).
const fs = require('fs');
const nrrd = require('nrrd-js');
const bytes = fs.readFileSync(process.argv[2]);
const parsed = nrrd.parse(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
let nonzero = 0;
for (const v of parsed.data) if (v !== 0) nonzero++;
console.log(JSON.stringify({
  type: parsed.type, encoding: parsed.encoding, sizes: parsed.sizes,
  length: parsed.data.length, bytesPerElement: parsed.data.BYTES_PER_ELEMENT, nonzero,
}));
