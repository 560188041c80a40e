import { z } from 'zod';

/** The value forms of config options: INI values arrive as strings, these check and convert them. */

export const bool = z
  .string()
  .trim()
  .toLowerCase()
  .pipe(z.enum(['true', 'false', 'yes', 'no', 'on', 'off', '1', '0']))
  .transform((s) => ['true', 'yes', 'on', '1'].includes(s));

export const int = (min: number, max = Number.MAX_SAFE_INTEGER) =>
  z
    .string()
    .trim()
    .regex(/^-?\d+$/, 'an integer')
    .transform(Number)
    .pipe(z.number().int().min(min).max(max));

export const num = (min: number) =>
  z
    .string()
    .trim()
    .regex(/^\d+(\.\d+)?$/, 'a number')
    .transform(Number)
    .pipe(z.number().min(min));

/** A number of seconds greater than 0. */
export const positiveNum = z
  .string()
  .trim()
  .regex(/^\d+(\.\d+)?$/, 'a number')
  .transform(Number)
  .pipe(z.number().positive());

export const str = z.string();
export const nonEmpty = z.string().trim().min(1, 'a non-empty string');
