import { describe, expect, it } from 'vitest';
import { loadConfigFromText } from '../../src/config/load.js';
import { ConfigError } from '../../src/errors.js';
import { imageStoreFromConfig } from '../../src/image-store/from-config.js';
import { GlanceImageStore } from '../../src/image-store/glance/store.js';
import { ImageStore } from '../../src/image-store/image-store.js';
import { silentLogger } from '../../src/log.js';

function problem(text: string): string {
  try {
    loadConfigFromText(text, '/etc/x.conf');
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return (err as Error).message;
  }
  throw new Error('the config was accepted');
}

describe('[image_store] backend and [glance]', () => {
  it('defaults to the local store, with Glance options that do nothing', () => {
    const c = loadConfigFromText('', '/etc/x.conf');
    expect(c.image_store.backend).toBe('local');
    expect(c.glance).toEqual({ api_servers: [], timeout: 60, retries: 3, auth_strategy: 'keystone' });
    expect(imageStoreFromConfig(c, silentLogger())).toBeInstanceOf(ImageStore);
  });

  it('reads a Glance config: servers in order, trailing slashes dropped, a path prefix kept', () => {
    const c = loadConfigFromText(
      '[image_store]\nbackend = glance\n[glance]\napi_servers = http://g1:9292/, https://g2.example/image\ntimeout = 2.5\nretries = 0\nauth_strategy = noauth\n',
      '/etc/x.conf',
    );
    expect(c.glance).toEqual({ api_servers: ['http://g1:9292', 'https://g2.example/image'], timeout: 2.5, retries: 0, auth_strategy: 'noauth' });
    const store = imageStoreFromConfig(c, silentLogger());
    expect(store).toBeInstanceOf(GlanceImageStore);
    expect(store.backend).toBe('glance');
  });

  it('refuses backend = glance without api_servers, naming section and option', () => {
    expect(problem('[image_store]\nbackend = glance\n')).toMatch(/^\[glance\] api_servers .*required with \[image_store\] backend = glance/);
  });

  it('refuses bad values, naming section, option and the expected form', () => {
    expect(problem('[image_store]\nbackend = swift\n')).toMatch(/^\[image_store\] backend = "swift" in \/etc\/x\.conf:2: expected one of local, glance/);
    expect(problem('[glance]\napi_servers = ftp://g1\n')).toMatch(/^\[glance\] api_servers .*http:\/\/ or https:\/\/ URLs.*ftp: is not http: or https:/);
    expect(problem('[glance]\napi_servers = g1:9292\n')).toMatch(/^\[glance\] api_servers .*http:\/\/ or https:\/\/ URLs/);
    // The value is not echoed: it may hold a password.
    expect(problem('[glance]\napi_servers = http://user:s3cret@g1, http://g2\n')).toMatch(/^\[glance\] api_servers in \/etc\/x\.conf:2: .*\(g1: credentials do not belong in the URL\)$/);
    expect(problem('[glance]\napi_servers = http://user:s3cret@g1\n')).not.toContain('s3cret');
    expect(problem('[glance]\napi_servers = http://user:s3cret@g 1\n')).toMatch(/\(\"http:\/\/user:\*\*\*@g 1\" is not a URL\)/);
    expect(problem('[glance]\ntimeout = 0\n')).toMatch(/^\[glance\] timeout = "0" in \/etc\/x\.conf:2: /);
    expect(problem('[glance]\nretries = -1\n')).toMatch(/^\[glance\] retries = "-1"/);
    expect(problem('[glance]\nauth_strategy = token\n')).toMatch(/^\[glance\] auth_strategy = "token" .*expected one of keystone, noauth/);
  });
});
