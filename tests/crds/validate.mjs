// Validate cert-manager objects (JSON lines on stdin) against cert-manager's CRD schemas, as
// published in @kubernetes-models/cert-manager. Prints one JSON line per object: {"ok": true} or
// {"ok": false, "error": "..."}. Unknown kinds are errors: nothing passes unchecked.
import { createInterface } from "node:readline";
import { Certificate } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate";
import { Issuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Issuer";
import { ClusterIssuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1/ClusterIssuer";

const models = { "cert-manager.io/v1 Certificate": Certificate, "cert-manager.io/v1 Issuer": Issuer,
                 "cert-manager.io/v1 ClusterIssuer": ClusterIssuer };
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const doc = JSON.parse(line);
  const Model = models[`${doc.apiVersion} ${doc.kind}`];
  try {
    if (!Model) throw new Error(`no schema for ${doc.apiVersion} ${doc.kind}`);
    new Model(doc).validate();
    console.log(JSON.stringify({ ok: true }));
  } catch (e) {
    console.log(JSON.stringify({ ok: false, error: String(e.message) }));
  }
}
