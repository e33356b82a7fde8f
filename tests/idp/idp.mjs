// A real external identity provider for aigis's tests: node's oidc-provider (a certified OpenID
// provider) serving OpenID discovery, its JWK Set and an OAuth2 token endpoint over HTTPS on
// loopback. Client credentials with resource indicators give ES256 JWT access tokens (typ at+jwt);
// tls_client_auth clients get certificate-bound tokens (RFC 8705 cnf x5t#S256).
//
// usage: node idp.mjs CONFIG.json   (see tests/test_oidc_provider.py for the fields)
// Prints "ISSUER <url>" once listening. SIGHUP re-reads the signing keys (key rotation) and
// prints "RELOADED <kids>". SIGTERM stops it.
import { readFileSync } from 'node:fs';
import { X509Certificate } from 'node:crypto';
import https from 'node:https';
import process from 'node:process';

import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));

function peerCertificate(ctx) {
  const peer = ctx.socket.getPeerCertificate?.(false);
  return peer && peer.raw ? new X509Certificate(peer.raw) : undefined;
}

function buildProvider(issuer) {
  const jwks = JSON.parse(readFileSync(config.jwks_file, 'utf8'));
  const provider = new Provider(issuer, {
    jwks,
    clients: config.clients,
    // Only EC keys are published; the default (RS256) would make every client invalid.
    clientDefaults: { id_token_signed_response_alg: 'ES256' },
    clientAuthMethods: ['client_secret_basic', 'tls_client_auth'],
    ttl: { ClientCredentials: 300, AccessToken: 300 },
    scopes: config.scope.split(' '),
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: false },
      revocation: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => config.resource,
        useGrantedResource: () => true,
        getResourceServerInfo: (_ctx, resourceIndicator) => {
          if (resourceIndicator !== config.resource) {
            throw new Error('unknown resource indicator');
          }
          return {
            scope: config.scope,
            audience: config.audience,
            accessTokenTTL: 300,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'ES256' } },
          };
        },
      },
      mTLS: {
        enabled: true,
        tlsClientAuth: true,
        certificateBoundAccessTokens: true,
        getCertificate: peerCertificate,
        certificateAuthorized: (ctx) => ctx.socket.authorized === true,
        certificateSubjectMatches: (ctx, property, expected) => {
          const cert = peerCertificate(ctx);
          if (!cert || property !== 'tls_client_auth_san_uri') return false;
          return (cert.subjectAltName || '').split(', ').includes(`URI:${expected}`);
        },
      },
    },
  });
  provider.on('server_error', (_ctx, err) => process.stderr.write(`server_error: ${err}\n`));
  return provider;
}

const server = https.createServer({
  cert: readFileSync(config.tls.cert),
  key: readFileSync(config.tls.key),
  ca: readFileSync(config.tls.ca),
  requestCert: true, // tls_client_auth needs the client certificate ...
  rejectUnauthorized: false, // ... but client_secret_basic clients come without one
});

let handler = null;
server.on('request', (req, res) => handler(req, res));
server.listen(config.port ?? 0, config.host ?? '127.0.0.1', () => {
  const issuer = `https://localhost:${server.address().port}`;
  handler = buildProvider(issuer).callback();
  process.on('SIGHUP', () => {
    handler = buildProvider(issuer).callback();
    const kids = JSON.parse(readFileSync(config.jwks_file, 'utf8')).keys.map((k) => k.kid);
    process.stdout.write(`RELOADED ${kids.join(',')}\n`);
  });
  process.stdout.write(`ISSUER ${issuer}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
